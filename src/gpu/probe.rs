//! What the GPU side of this machine offers: driver, NVRTC, devices. Never panics; a missing
//! piece is a line in [`GpuProbe::problems`].

use super::sys::{self, NvrtcLocation};

/// One CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuDevice {
    /// Driver ordinal (what [`super::GpuHead::new`] takes).
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_mem_bytes: usize,
}

/// The NVRTC library in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcInfo {
    /// Where it was found.
    pub location: NvrtcLocation,
    /// (major, minor).
    pub version: (i32, i32),
}

/// Result of [`probe`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuProbe {
    /// CUDA driver version (e.g. 12080), when the driver library loads.
    pub driver_version: Option<i32>,
    /// NVRTC, when found.
    pub nvrtc: Option<NvrtcInfo>,
    /// Devices the driver reports.
    pub devices: Vec<GpuDevice>,
    /// Why a GPU head cannot run here (empty when it can).
    pub problems: Vec<String>,
}

impl GpuProbe {
    /// True when a [`super::GpuHead`] can be built: driver, NVRTC and at least one device.
    pub fn is_usable(&self) -> bool {
        self.driver_version.is_some() && self.nvrtc.is_some() && !self.devices.is_empty()
    }

    /// One line saying why the GPU head cannot run ("" when it can).
    pub fn reason(&self) -> String {
        self.problems.join("; ")
    }
}

impl std::fmt::Display for GpuProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.driver_version {
            Some(v) => write!(f, "driver: CUDA {}.{}", v / 1000, (v % 1000) / 10)?,
            None => f.write_str("driver: absent")?,
        }
        match &self.nvrtc {
            Some(n) => write!(
                f,
                "; nvrtc: {}.{} ({})",
                n.version.0, n.version.1, n.location
            )?,
            None => f.write_str("; nvrtc: absent")?,
        }
        for d in &self.devices {
            write!(
                f,
                "; gpu {}: {} (sm_{}{}, {} MiB)",
                d.ordinal,
                d.name,
                d.compute_capability.0,
                d.compute_capability.1,
                d.total_mem_bytes >> 20
            )?;
        }
        if !self.problems.is_empty() {
            write!(f, "; problems: {}", self.reason())?;
        }
        Ok(())
    }
}

/// Looks for the CUDA driver, NVRTC and devices. Cheap (no context is created) and never panics.
pub fn probe() -> GpuProbe {
    // cudarc panics where it cannot load a library or symbol. Every call below checks for the
    // library first; the catch is a last line of defence for a driver lacking a symbol.
    match std::panic::catch_unwind(probe_inner) {
        Ok(p) => p,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            GpuProbe {
                problems: vec![format!("probing the GPU panicked: {msg}")],
                ..GpuProbe::default()
            }
        }
    }
}

fn probe_inner() -> GpuProbe {
    let mut p = GpuProbe::default();
    match sys::nvrtc_library().and_then(|loc| Ok((loc.clone(), sys::nvrtc_version()?))) {
        Ok((location, version)) => p.nvrtc = Some(NvrtcInfo { location, version }),
        Err(e) => p.problems.push(e.to_string()),
    }
    match sys::driver_version() {
        Ok(v) => p.driver_version = Some(v),
        Err(e) => {
            p.problems.push(e.to_string());
            return p;
        }
    }
    let count = match sys::device_count() {
        Ok(c) => c,
        Err(e) => {
            p.problems.push(format!("no usable CUDA device: {e}"));
            return p;
        }
    };
    if count == 0 {
        p.problems.push("the CUDA driver reports no device".into());
    }
    for ordinal in 0..count {
        match sys::device_info(ordinal) {
            Ok((name, compute_capability, total_mem_bytes)) => p.devices.push(GpuDevice {
                ordinal,
                name,
                compute_capability,
                total_mem_bytes,
            }),
            Err(e) => p.problems.push(format!("gpu {ordinal}: {e}")),
        }
    }
    p
}
