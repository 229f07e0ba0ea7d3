//! The anomaly head per frame, GPU vs CPU in the same run, on the real model's shapes:
//! 37×37×768 tokens (+ the global token) → 518×518 map, and → 1080×1920 frame map.
//!
//! `cargo bench --bench gpu_head` (or the binary carried by `scripts/gpu-check` with `--bench`).
//! Without `--bench` (how `cargo test --all-targets` runs a `harness = false` bench) it does one
//! quick iteration of each. Without a usable GPU it prints `skipped: <reason>` and exits 0.
//! `--probe` prints the GPU probe and exits 0 when a GPU head can run, 2 when not.
//!
//! GPU timings cover whole `run_host`/`run_device` calls, which end with a synchronising copy, so
//! the device work is inside the timed region. `gpu-host` includes the 4.2 MB host → device copy
//! of the tokens; `gpu-device` starts from tokens already in device memory (ORT IoBinding).
//! The CPU column is `CpuHead::run` + `resize_map` (when the frame differs) + `map_stats`.
//! Output: `BENCH case=… impl=… median_ms=… min_ms=… n=…` lines, parsed by `scripts/gpu-check`.

use std::time::Instant;

use anomalyclip_edge::gpu::{self, GpuHead};
use anomalyclip_edge::head::{CpuHead, HeadConfig, HeadOutput, map_stats, resize_map};

const CFG: HeadConfig = HeadConfig {
    size: 518,
    grid: 37,
    dim: 768,
    tau: 0.07,
    sigma: 4.0,
};
const THRESHOLD: f32 = 0.5;

fn lcg_vec(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Times `f` `n` times after `warmup` calls; returns (median, min) in ms.
fn time(warmup: usize, n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warmup {
        f();
    }
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn print(case: &str, imp: &str, n: usize, (median, min): (f64, f64)) {
    println!("BENCH case={case} impl={imp} median_ms={median:.3} min_ms={min:.3} n={n}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let probe = gpu::probe();
    if args.iter().any(|a| a == "--probe") {
        println!("{probe}");
        std::process::exit(if probe.is_usable() { 0 } else { 2 });
    }
    if !probe.is_usable() {
        println!("gpu_head bench: skipped: {}", probe.reason());
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let (gpu_warm, gpu_n, cpu_warm, cpu_n) = if full { (20, 200, 1, 10) } else { (0, 1, 0, 1) };

    let mut seed = 42u64;
    let text = lcg_vec(&mut seed, 2 * CFG.dim);
    let global = lcg_vec(&mut seed, CFG.dim);
    let tokens = lcg_vec(&mut seed, CFG.grid * CFG.grid * CFG.dim);
    let locals: [&[f32]; 1] = [&tokens];

    for (out_h, out_w) in [(518usize, 518usize), (1080, 1920)] {
        let case = format!("{out_w}x{out_h}");
        let mut head = GpuHead::new(0, &text, &CFG, out_h, out_w).expect("gpu head");
        head.set_threshold(THRESHOLD);
        println!(
            "DEVICE name=\"{}\" sm={}.{} kernels={:?}",
            head.device_name(),
            head.compute_capability().0,
            head.compute_capability().1,
            head.target()
        );
        let t = time(gpu_warm, gpu_n, || {
            head.run_host(&global, &locals).expect("run_host");
        });
        print(&case, "gpu-host", gpu_n, t);

        let stream = head.stream().clone();
        let g_dev = stream.clone_htod(&global).expect("upload");
        let l_dev = stream.clone_htod(&tokens).expect("upload");
        let views = [l_dev.as_view()];
        let t = time(gpu_warm, gpu_n, || {
            head.run_device(&g_dev.as_view(), &views)
                .expect("run_device");
        });
        print(&case, "gpu-device", gpu_n, t);

        let mut cpu = CpuHead::new(CFG, &text).expect("cpu head");
        let mut out = HeadOutput::new(&CFG);
        let t = time(cpu_warm, cpu_n, || {
            cpu.run(&global, &locals, &mut out).expect("cpu run");
            let stats = if (out_h, out_w) == (CFG.size, CFG.size) {
                map_stats(&out.map, THRESHOLD)
            } else {
                map_stats(
                    &resize_map(&out.map, CFG.size, CFG.size, out_h, out_w),
                    THRESHOLD,
                )
            };
            std::hint::black_box(stats);
        });
        print(&case, "cpu", cpu_n, t);
    }
}
