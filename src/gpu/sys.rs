//! Every `unsafe` of the GPU head, in one place: finding and loading the CUDA driver and NVRTC
//! libraries, NVRTC compilation (PTX or CUBIN), and the kernel launches.
//!
//! Input: kernel source text, device buffers owned by the caller. Output: compiled images and
//! kernels enqueued on the caller's stream. Failure modes: a library that cannot be found (a
//! typed error, never the panic cudarc raises when it dlopens a missing library), a driver or
//! NVRTC call that fails, a buffer too small for a launch (checked here before every launch, so a
//! kernel can never read or write out of bounds of the buffers it is given).
//!
//! # How the libraries are found
//! cudarc 0.19 (`dynamic-loading`, `cuda-12080`) dlopens bare names: for the driver `libcuda.so`,
//! …, `libcuda.so.1`; for NVRTC `libnvrtc.so`, `libnvrtc64_12.so`, …, `libnvrtc.so.12`,
//! `libnvrtc.so.11`, …  (see `cudarc::get_lib_name_candidates`). The dynamic loader resolves those
//! through `LD_LIBRARY_PATH` (read once at process start), the ld.so cache and RUNPATH, and cudarc
//! panics if none loads. Before cudarc is asked, [`nvrtc_library`]:
//! 1. honours `ANOMALYCLIP_NVRTC` (a `libnvrtc.so.12` file, or a folder holding one): that file is
//!    dlopened by absolute path;
//! 2. otherwise accepts whatever cudarc's own names already find (system toolkit, `LD_LIBRARY_PATH`);
//! 3. otherwise dlopens `libnvrtc.so.12` (or `.so.11`) by absolute path from, in order: `.deps/nvrtc`
//!    in the current directory and in up to five folders above the executable (where
//!    `scripts/fetch-nvrtc` installs the PyPI wheel's copy), `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!    `/usr/local/cuda/lib64`, `/usr/local/cuda/targets/x86_64-linux/lib`.
//!
//! A library loaded by absolute path satisfies cudarc's later `dlopen("libnvrtc.so.12")` because
//! glibc matches an already loaded object by its SONAME. That is why only files whose SONAME is on
//! cudarc's list are preloaded: a CUDA 13 `libnvrtc.so.13` is not, and must be reached through a
//! `libnvrtc.so` link on `LD_LIBRARY_PATH` (`scripts/gpu-check run` makes one).

use std::ffi::{CStr, CString, c_char};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{self, Ptx};

use super::GpuError;

/// Environment variable naming the NVRTC library file (or a folder holding `libnvrtc.so.12`).
pub const NVRTC_ENV: &str = "ANOMALYCLIP_NVRTC";

/// NVRTC file names whose SONAME cudarc 0.19 (`cuda-12080`) looks for, most preferred first.
const NVRTC_FILES: [&str; 2] = ["libnvrtc.so.12", "libnvrtc.so.11"];

/// Most token layers one launch of `head_tokens` sums (the reference uses 1; 4 = layers 6/12/18/24).
pub const MAX_LAYERS: usize = 4;

/// Where the NVRTC library came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvrtcLocation {
    /// Found by the dynamic loader under one of cudarc's names (system install, `LD_LIBRARY_PATH`).
    LoaderPath,
    /// Loaded by absolute path before cudarc asked for it.
    Preloaded(PathBuf),
}

impl std::fmt::Display for NvrtcLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LoaderPath => f.write_str("dynamic loader search path"),
            Self::Preloaded(p) => write!(f, "{}", p.display()),
        }
    }
}

/// True when the CUDA driver library (`libcuda.so.1`) can be loaded. Never panics.
pub fn driver_library_present() -> bool {
    // SAFETY: `is_culib_present` only dlopens candidate names and drops the handles; loading the
    // NVIDIA driver library runs its initialisers, which have no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Makes sure cudarc will find an NVRTC library (see the module docs); the answer is computed once
/// per process. Call before any `cudarc::nvrtc` function: cudarc panics without the library.
pub fn nvrtc_library() -> Result<&'static NvrtcLocation, GpuError> {
    static FOUND: OnceLock<Result<NvrtcLocation, String>> = OnceLock::new();
    FOUND
        .get_or_init(locate_nvrtc)
        .as_ref()
        .map_err(|searched| GpuError::NvrtcMissing {
            searched: searched.clone(),
        })
}

fn cudarc_finds_nvrtc() -> bool {
    // SAFETY: as in `driver_library_present`: dlopen of candidate names, handles dropped.
    unsafe { nvrtc::sys::is_culib_present() }
}

fn locate_nvrtc() -> Result<NvrtcLocation, String> {
    if let Some(value) = std::env::var_os(NVRTC_ENV) {
        let path = PathBuf::from(&value);
        let file = if path.is_dir() {
            NVRTC_FILES
                .iter()
                .map(|f| path.join(f))
                .find(|p| p.is_file())
        } else {
            Some(path.clone())
        };
        let Some(file) = file else {
            return Err(format!(
                "{NVRTC_ENV}={} (no {} in that folder)",
                path.display(),
                NVRTC_FILES.join(" or ")
            ));
        };
        return match preload(&file) {
            Ok(()) if cudarc_finds_nvrtc() => Ok(NvrtcLocation::Preloaded(file)),
            Ok(()) => Err(format!(
                "{NVRTC_ENV}={} (loaded, but its SONAME is not one cudarc asks for: {}; \
                 put a libnvrtc.so link to it on LD_LIBRARY_PATH instead)",
                file.display(),
                NVRTC_FILES.join(", ")
            )),
            Err(e) => Err(format!("{NVRTC_ENV}={} ({e})", file.display())),
        };
    }
    if cudarc_finds_nvrtc() {
        return Ok(NvrtcLocation::LoaderPath);
    }
    let dirs = nvrtc_search_dirs();
    for dir in &dirs {
        for name in NVRTC_FILES {
            let file = dir.join(name);
            if file.is_file() && preload(&file).is_ok() && cudarc_finds_nvrtc() {
                return Ok(NvrtcLocation::Preloaded(file));
            }
        }
    }
    let mut searched =
        vec!["LD_LIBRARY_PATH and the ld.so cache (libnvrtc.so, libnvrtc.so.12, …)".to_string()];
    searched.extend(dirs.iter().map(|d| d.display().to_string()));
    Err(searched.join(", "))
}

fn nvrtc_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd.join(".deps/nvrtc"));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(
            exe.ancestors()
                .skip(1)
                .take(5)
                .map(|d| d.join(".deps/nvrtc")),
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// dlopen `file` by absolute path and keep it loaded for the life of the process.
fn preload(file: &Path) -> Result<(), String> {
    let abs = std::fs::canonicalize(file).map_err(|e| e.to_string())?;
    let c = CString::new(abs.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path. The handle is deliberately never closed, so the
    // library (and the symbols cudarc later resolves from it) stays mapped until the process ends.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libc, copied at once.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "dlopen failed".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(msg);
    }
    Ok(())
}

/// The CUDA driver's version, e.g. 12080 for 12.8. The driver library must be present.
pub fn driver_version() -> Result<i32, GpuError> {
    if !driver_library_present() {
        return Err(GpuError::DriverMissing);
    }
    let mut v = 0;
    // SAFETY: the library is present (checked above); `v` is a valid out-pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok(v)
}

/// NVRTC's (major, minor) version, after locating the library.
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    nvrtc_library()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (nvrtc_library succeeded); both out-pointers are valid.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
    Ok((major, minor))
}

/// What NVRTC produced: PTX text (virtual `compute_XY`) or a CUBIN (real `sm_XY`).
#[derive(Clone, Debug)]
pub enum Image {
    /// PTX assembly, without the trailing NUL.
    Ptx(String),
    /// A CUBIN ELF image for one real architecture.
    Cubin(Vec<u8>),
}

impl Image {
    /// The form cudarc loads into a module.
    pub(crate) fn into_ptx(self) -> Ptx {
        match self {
            Self::Ptx(s) => Ptx::from_src(s),
            Self::Cubin(b) => Ptx::from_binary(b),
        }
    }
}

/// Destroys an NVRTC program on every exit path.
struct Program(nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by create_program and is destroyed exactly once, here.
        let _ = unsafe { nvrtc::result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `source` with NVRTC. `options` are NVRTC flags; pass `--gpu-architecture=sm_XY` with
/// `cubin = true`, or `compute_XY` with `cubin = false`.
pub fn compile(
    source: &str,
    name: &str,
    options: &[String],
    cubin: bool,
) -> Result<Image, GpuError> {
    nvrtc_library()?;
    let src =
        CString::new(source).map_err(|_| GpuError::Input("kernel source holds a NUL".into()))?;
    let name =
        CString::new(name).map_err(|_| GpuError::Input("program name holds a NUL".into()))?;
    let prog = Program(nvrtc::result::create_program(&src, Some(&name))?);
    // SAFETY: prog.0 is a live program (destroyed only when `prog` drops, after every use here).
    if let Err(e) = unsafe { nvrtc::result::compile_program(prog.0, options) } {
        // SAFETY: as above; the log is copied into an owned String.
        let log = unsafe { nvrtc::result::get_program_log(prog.0) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        return Err(GpuError::Compile {
            options: options.join(" "),
            log,
            source: e,
        });
    }
    if cubin {
        let mut size = 0usize;
        // SAFETY: prog.0 is live and compiled; `size` is a valid out-pointer.
        unsafe { nvrtc::sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result()?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds exactly the `size` bytes NVRTC reported for this program's CUBIN.
        unsafe { nvrtc::sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }.result()?;
        if buf.is_empty() {
            return Err(GpuError::Input(
                "NVRTC returned an empty CUBIN (a virtual compute_XY target gives PTX only)".into(),
            ));
        }
        Ok(Image::Cubin(buf))
    } else {
        // SAFETY: prog.0 is live and compiled.
        let ptx = unsafe { nvrtc::result::get_ptx(prog.0) }?;
        Ok(Image::Ptx(c_chars_to_string(&ptx)))
    }
}

/// Device addresses of up to [`MAX_LAYERS`] token layers, passed to `head_tokens` by value.
/// Same layout as `struct TokenLayers` in kernels.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct TokenLayers {
    layer: [u64; MAX_LAYERS],
}

// SAFETY: plain #[repr(C)] data (four u64 device addresses), identical in size and alignment to
// the kernel's `struct { const float* layer[4]; }` on 64-bit targets.
unsafe impl DeviceRepr for TokenLayers {}

fn to_i32(v: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::Input(format!("{what} = {v} does not fit a kernel int")))
}

fn check_len(have: usize, need: usize, what: &str) -> Result<(), GpuError> {
    if have < need {
        return Err(GpuError::Input(format!(
            "{what} holds {have} elements, the launch needs {need}"
        )));
    }
    Ok(())
}

/// Rows of output each `gauss_cols` block produces (8 per thread row of a 32×8 block).
const COL_TILE_H: u32 = 64;
/// Threads (= outputs) per `gauss_rows` block.
const ROW_TILE_W: u32 = 256;
/// Dynamic shared memory the launches may use without opting in to more (48 KiB on every GPU).
pub const MAX_SHARED_BYTES: usize = 48 * 1024;

/// Dynamic shared memory of the two Gaussian passes for `radius`: (cols, rows) in bytes.
pub fn gauss_shared_bytes(radius: usize) -> (usize, usize) {
    let taps = 2 * radius + 1;
    let cols = (taps + (COL_TILE_H as usize + 2 * radius) * 32) * 4;
    let rows = (taps + ROW_TILE_W as usize + 2 * radius) * 4;
    (cols, rows)
}

fn blocks(n: usize, per_block: u32) -> Result<u32, GpuError> {
    u32::try_from(n.div_ceil(per_block as usize))
        .map_err(|_| GpuError::Input(format!("{n} elements need too many blocks")))
}

/// The loaded kernels of kernels.cu; one method per kernel checks the buffer sizes the kernel
/// relies on and enqueues it on `stream`. Nothing here synchronises.
#[derive(Debug)]
pub(crate) struct Kernels {
    head_tokens: CudaFunction,
    bilinear_resize: CudaFunction,
    gauss_cols: CudaFunction,
    gauss_rows: CudaFunction,
    map_stats: CudaFunction,
    quantize_mask: CudaFunction,
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self, GpuError> {
        Ok(Self {
            head_tokens: module.load_function("head_tokens")?,
            bilinear_resize: module.load_function("bilinear_resize")?,
            gauss_cols: module.load_function("gauss_cols")?,
            gauss_rows: module.load_function("gauss_rows")?,
            map_stats: module.load_function("map_stats")?,
            quantize_mask: module.load_function("quantize_mask")?,
        })
    }

    /// (a) `patch[j] = Σ_l sigmoid(<x̂_lj, w>)`, `scalars[0] = bits(sigmoid(<ĝ, w>))`.
    /// Each layer view holds n × dim floats (the same n for all), `global` dim floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn head_tokens(
        &self,
        stream: &Arc<CudaStream>,
        global: &CudaView<'_, f32>,
        layers: &[CudaView<'_, f32>],
        dim: usize,
        w: &CudaSlice<f32>,
        scalars: &mut CudaSlice<u32>,
        patch: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if layers.is_empty() || layers.len() > MAX_LAYERS {
            return Err(GpuError::Input(format!(
                "{} token layers given, 1..={MAX_LAYERS} supported",
                layers.len()
            )));
        }
        if dim == 0 || layers[0].len() % dim != 0 {
            return Err(GpuError::Input(format!(
                "token layer of {} floats is not a whole number of {dim}-float tokens",
                layers[0].len()
            )));
        }
        let n = layers[0].len() / dim;
        for (l, v) in layers.iter().enumerate() {
            if v.len() != n * dim {
                return Err(GpuError::Input(format!(
                    "token layer {l} holds {} floats, layer 0 holds {}",
                    v.len(),
                    n * dim
                )));
            }
        }
        check_len(global.len(), dim, "global token")?;
        check_len(w.len(), dim, "text direction w")?;
        check_len(scalars.len(), 4, "scalars")?;
        check_len(patch.len(), n, "patch buffer")?;
        let total_threads = (1 + n) * 32;
        let cfg = LaunchConfig {
            grid_dim: (blocks(total_threads, 256)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut ptrs = TokenLayers::default();
        let mut guards = Vec::with_capacity(layers.len());
        for (slot, v) in ptrs.layer.iter_mut().zip(layers) {
            let (p, g) = v.device_ptr(stream);
            *slot = p;
            guards.push(g);
        }
        let (n_layers, n_i, dim_i) = (
            to_i32(layers.len(), "layers")?,
            to_i32(n, "tokens per layer")?,
            to_i32(dim, "dim")?,
        );
        let mut b = stream.launch_builder(&self.head_tokens);
        b.arg(global)
            .arg(&ptrs)
            .arg(&n_layers)
            .arg(&n_i)
            .arg(&dim_i)
            .arg(w)
            .arg(scalars)
            .arg(patch);
        // SAFETY: argument types and order match the kernel signature. Every layer pointer in
        // `ptrs` addresses n*dim floats (checked above) and stays valid while `layers` is borrowed;
        // the kernel reads global[0..dim], w[0..dim], layer[l][0..n*dim] and writes scalars[0] and
        // patch[0..n], all within the lengths checked above.
        unsafe { b.launch(cfg) }?;
        drop(guards);
        Ok(())
    }

    /// (b)/(d) `dst` (dst_h × dst_w) = `src` (src_h × src_w) bilinearly resized,
    /// align_corners=False.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bilinear_resize(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
        src_h: usize,
        src_w: usize,
        dst: &mut CudaSlice<f32>,
        dst_h: usize,
        dst_w: usize,
    ) -> Result<(), GpuError> {
        if src_h == 0 || src_w == 0 || dst_h == 0 || dst_w == 0 {
            return Err(GpuError::Input("bilinear resize of an empty map".into()));
        }
        check_len(src.len(), src_h * src_w, "bilinear source")?;
        check_len(dst.len(), dst_h * dst_w, "bilinear destination")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(dst_w, 32)?, blocks(dst_h, 8)?, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (sh, sw, dh, dw) = (
            to_i32(src_h, "src_h")?,
            to_i32(src_w, "src_w")?,
            to_i32(dst_h, "dst_h")?,
            to_i32(dst_w, "dst_w")?,
        );
        let mut b = stream.launch_builder(&self.bilinear_resize);
        b.arg(src).arg(&sh).arg(&sw).arg(dst).arg(&dh).arg(&dw);
        // SAFETY: arguments match the kernel signature; it reads src[0..src_h*src_w] and writes
        // dst[0..dst_h*dst_w], both within the lengths checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// (c) Separable Gaussian, scipy 'reflect' border: `src` → `tmp` (vertical) → `dst`
    /// (horizontal). `taps` holds 2·radius + 1 weights.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gaussian(
        &self,
        stream: &Arc<CudaStream>,
        src: &CudaSlice<f32>,
        tmp: &mut CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        h: usize,
        w: usize,
        taps: &CudaSlice<f32>,
        radius: usize,
    ) -> Result<(), GpuError> {
        if h == 0 || w == 0 {
            return Err(GpuError::Input("gaussian blur of an empty map".into()));
        }
        check_len(src.len(), h * w, "blur source")?;
        check_len(tmp.len(), h * w, "blur scratch")?;
        check_len(dst.len(), h * w, "blur destination")?;
        check_len(taps.len(), 2 * radius + 1, "gaussian taps")?;
        let (cols_shm, rows_shm) = gauss_shared_bytes(radius);
        if cols_shm.max(rows_shm) > MAX_SHARED_BYTES {
            return Err(GpuError::Input(format!(
                "gaussian radius {radius} needs {} bytes of shared memory (max {MAX_SHARED_BYTES})",
                cols_shm.max(rows_shm)
            )));
        }
        let (hi, wi, ri, tile_h) = (
            to_i32(h, "h")?,
            to_i32(w, "w")?,
            to_i32(radius, "radius")?,
            COL_TILE_H as i32,
        );
        let cols_cfg = LaunchConfig {
            grid_dim: (blocks(w, 32)?, blocks(h, COL_TILE_H)?, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: cols_shm as u32,
        };
        {
            let mut b = stream.launch_builder(&self.gauss_cols);
            b.arg(src)
                .arg(&mut *tmp)
                .arg(&hi)
                .arg(&wi)
                .arg(taps)
                .arg(&ri)
                .arg(&tile_h);
            // SAFETY: arguments match the kernel; it reads src[0..h*w] (rows reflected into
            // [0, h)) and taps[0..2r+1], writes tmp[0..h*w]; the dynamic shared memory it indexes,
            // (2r+1) + (tile_h+2r)*32 floats, is exactly cols_shm (≤ 48 KiB, checked above).
            unsafe { b.launch(cols_cfg) }?;
        }
        let rows_cfg = LaunchConfig {
            grid_dim: (blocks(w, ROW_TILE_W)?, to_u32(h)?, 1),
            block_dim: (ROW_TILE_W, 1, 1),
            shared_mem_bytes: rows_shm as u32,
        };
        let mut b = stream.launch_builder(&self.gauss_rows);
        b.arg(&*tmp).arg(dst).arg(&hi).arg(&wi).arg(taps).arg(&ri);
        // SAFETY: arguments match the kernel; it reads tmp[0..h*w] (columns reflected into
        // [0, w)) and taps, writes dst[0..h*w]; shared memory (2r+1) + 256 + 2r floats = rows_shm.
        unsafe { b.launch(rows_cfg) }?;
        Ok(())
    }

    /// (e) `scalars[1]` = max(order key of map[0..n]), `scalars[2]` += count(map >= thr),
    /// `scalars[3]` += count(map not finite). `scalars[1..4]` must have been zeroed on this
    /// stream before.
    pub(crate) fn map_stats(
        &self,
        stream: &Arc<CudaStream>,
        map: &CudaSlice<f32>,
        n: usize,
        thr: f32,
        scalars: &mut CudaSlice<u32>,
    ) -> Result<(), GpuError> {
        check_len(map.len(), n, "map")?;
        check_len(scalars.len(), 4, "scalars")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(n, 256)?.clamp(1, 1024), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ni = to_i32(n, "map length")?;
        let mut b = stream.launch_builder(&self.map_stats);
        b.arg(map).arg(&ni).arg(&thr).arg(scalars);
        // SAFETY: arguments match the kernel; it reads map[0..n] and updates scalars[1..4] with
        // atomics, within the lengths checked above. 256 threads = whole warps (full-mask shuffles).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// (f) `q = round(clamp(map,0,1)*255)`, `mask = map >= thr ? 255 : 0`, n elements each.
    pub(crate) fn quantize_mask(
        &self,
        stream: &Arc<CudaStream>,
        map: &CudaSlice<f32>,
        n: usize,
        thr: f32,
        q: &mut CudaSlice<u8>,
        mask: &mut CudaSlice<u8>,
    ) -> Result<(), GpuError> {
        check_len(map.len(), n, "map")?;
        check_len(q.len(), n, "u8 map")?;
        check_len(mask.len(), n, "mask")?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(n, 256)?.clamp(1, 4096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ni = to_i32(n, "map length")?;
        let mut b = stream.launch_builder(&self.quantize_mask);
        b.arg(map).arg(&ni).arg(&thr).arg(q).arg(mask);
        // SAFETY: arguments match the kernel; it reads map[0..n], writes q[0..n] and mask[0..n].
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

fn to_u32(v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::Input(format!("{v} does not fit a grid dimension")))
}

/// Device memory that someone else owns (ONNX Runtime's IoBinding outputs) seen as a
/// `CudaSlice`, so that the kernels can read it. Dropping it never frees the memory.
#[derive(Debug)]
pub(crate) struct Borrowed(ManuallyDrop<CudaSlice<f32>>);

impl Borrowed {
    /// Borrows `len` f32 at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must address at least `len` f32 of device memory in `stream`'s context, written
    /// completely (by work on `stream` or already synchronised), and stay allocated and unchanged
    /// until the returned value and every view of it are dropped.
    pub(crate) unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Borrowed {
        // With event tracking off, cudarc creates no events for the slice (nothing to fail or to
        // wait on: the head uses it on its one stream only).
        let slice = without_event_tracking(stream.context(), || {
            // SAFETY: the caller's contract above is `upgrade_device_ptr`'s; the slice is never
            // dropped as an owner (see `Drop`), so the foreign memory is never freed.
            unsafe { stream.upgrade_device_ptr(ptr, len) }
        });
        Borrowed(ManuallyDrop::new(slice))
    }

    /// The whole borrowed range.
    pub(crate) fn view(&self) -> CudaView<'_, f32> {
        self.0.as_view()
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        // SAFETY: the slice is taken out exactly once, here, and `self.0` is not used after.
        let slice = unsafe { ManuallyDrop::take(&mut self.0) };
        // Releases the slice's stream handle without freeing the device memory.
        slice.leak();
    }
}

/// Runs `f` (which allocates this head's buffers) with cudarc's per-buffer event tracking off, so
/// that launches on those buffers do not record and wait on CUDA events.
pub(crate) fn without_event_tracking<R>(ctx: &Arc<CudaContext>, f: impl FnOnce() -> R) -> R {
    let was = ctx.is_event_tracking();
    // SAFETY: buffers created inside `f` get no read/write events. That is sound because the GPU
    // head uses them on its one stream only (stream order is the synchronisation), frees them with
    // stream-ordered frees on that same stream, and copies to the host synchronise that stream.
    // Tracking is restored right after, for buffers other code allocates in this context.
    unsafe { ctx.disable_event_tracking() };
    let r = f();
    if was {
        // SAFETY: restores the state found on entry; only buffers created in `f` are untracked.
        unsafe { ctx.enable_event_tracking() };
    }
    r
}

/// Number of CUDA devices the driver reports (initialises the driver). Driver must be present.
pub(crate) fn device_count() -> Result<usize, GpuError> {
    if !driver_library_present() {
        return Err(GpuError::DriverMissing);
    }
    cudarc::driver::result::init()?;
    Ok(cudarc::driver::result::device::get_count()?.max(0) as usize)
}

/// Name, compute capability and memory of device `ordinal`, without creating a context.
pub(crate) fn device_info(ordinal: usize) -> Result<(String, (i32, i32), usize), GpuError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let count = device_count()?;
    if ordinal >= count {
        return Err(GpuError::NoDevice { ordinal, count });
    }
    let dev = cudarc::driver::result::device::get(to_i32(ordinal, "ordinal")?)?;
    let name = cudarc::driver::result::device::get_name(dev)?;
    // SAFETY: `dev` was returned by cuDeviceGet for an ordinal below the device count.
    let (major, minor, mem) = unsafe {
        (
            cudarc::driver::result::device::get_attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )?,
            cudarc::driver::result::device::get_attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            )?,
            cudarc::driver::result::device::total_mem(dev)?,
        )
    };
    Ok((name, (major, minor), mem))
}
