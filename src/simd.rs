//! Runtime CPU dispatch for the numerical loops: the same Rust code, compiled a second time with
//! AVX2 enabled and chosen when the CPU has it.
//!
//! The results are bit-identical on both paths: Rust never fuses multiply-adds or reassociates
//! floating-point sums, so only the vector width changes (`tests/head.rs` and
//! `tests/preprocess.rs` check it with [`set_avx2_enabled`]). All `unsafe` of the dispatch is here.

use std::sync::atomic::{AtomicBool, Ordering};

static AVX2_ENABLED: AtomicBool = AtomicBool::new(true);

/// Allows (default) or forbids the AVX2 copies; for tests and comparisons.
pub fn set_avx2_enabled(enabled: bool) {
    AVX2_ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the AVX2 copies run: allowed and supported by this CPU. Worth logging at start-up.
pub fn avx2_active() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        AVX2_ENABLED.load(Ordering::Relaxed) && std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `fn $name(args) -> ret` that calls the `#[inline(always)]` function `$imp` with the
/// same arguments, through a copy compiled for AVX2 when the CPU supports it.
macro_rules! dispatch_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                if $crate::simd::avx2_active() {
                    // SAFETY: `avx2` only needs the AVX2 instructions, which this CPU has
                    // (`avx2_active` checks it).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

pub(crate) use dispatch_avx2;
