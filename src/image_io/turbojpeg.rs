//! JPEG decoding with libjpeg-turbo, the library Pillow decodes with, loaded at run time.
//!
//! Pillow decodes JPEGs with libjpeg-turbo's defaults (ISLOW integer IDCT, "fancy" triangular
//! chroma upsampling, libjpeg's YCbCr→RGB tables). Pure-Rust decoders differ from it by a few
//! levels per sample (zune-jpeg: up to ±4 on 4:2:0 files), which moves the model input by up to
//! 0.06 — far outside the parity tolerance. The TurboJPEG API of `libturbojpeg.so.0` (Debian
//! package `libturbojpeg0`, version 2.1 and later) reproduces Pillow's pixels exactly (checked by
//! `tests/image_io.rs` against Pillow 13, which bundles libjpeg-turbo 3.2).
//!
//! The library is opened with `dlopen` on first use, so the crate builds and runs without it; when
//! it is missing, [`available`] is false and `image_io` falls back to the `image` crate's decoder
//! (documented drift). All `unsafe` code of the JPEG path is in this module.
//!
//! Input: JPEG bytes. Output: 8-bit samples, gray (1 channel), RGB (3) or CMYK (4, as stored).
//! Failure modes: the library's error string (corrupt data, unsupported JPEG such as 12-bit), or
//! "truncated" when libjpeg-turbo reached the end of the data early.

use std::ffi::{CStr, c_char, c_int, c_uchar, c_ulong, c_void};
use std::sync::OnceLock;

type Handle = *mut c_void;
type InitFn = unsafe extern "C" fn() -> Handle;
type HeaderFn = unsafe extern "C" fn(
    Handle,
    *const c_uchar,
    c_ulong,
    *mut c_int,
    *mut c_int,
    *mut c_int,
    *mut c_int,
) -> c_int;
type DecompressFn = unsafe extern "C" fn(
    Handle,
    *const c_uchar,
    c_ulong,
    *mut c_uchar,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_int;
type ErrorStrFn = unsafe extern "C" fn(Handle) -> *mut c_char;
type ErrorCodeFn = unsafe extern "C" fn(Handle) -> c_int;
type DestroyFn = unsafe extern "C" fn(Handle) -> c_int;

/// TurboJPEG pixel formats and colour spaces (turbojpeg.h, stable since 1.2).
const TJPF_RGB: c_int = 0;
const TJPF_GRAY: c_int = 6;
const TJPF_CMYK: c_int = 11;
const TJCS_GRAY: c_int = 2;
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;
const TJERR_WARNING: c_int = 0;

struct Api {
    init: InitFn,
    header: HeaderFn,
    decompress: DecompressFn,
    error_str: ErrorStrFn,
    error_code: ErrorCodeFn,
    destroy: DestroyFn,
}

// SAFETY: the table only holds function pointers into a library that stays loaded for the life of
// the process (it is never dlclose'd); TurboJPEG functions are thread-safe on distinct handles.
unsafe impl Send for Api {}
// SAFETY: as above; the table is immutable after loading.
unsafe impl Sync for Api {}

static API: OnceLock<Option<Api>> = OnceLock::new();

/// Library names tried, in order.
const LIBRARIES: [&CStr; 2] = [c"libturbojpeg.so.0", c"libturbojpeg.so"];

fn load() -> Option<Api> {
    for name in LIBRARIES {
        // SAFETY: `name` is a valid NUL-terminated string; dlopen has no other preconditions.
        let lib = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            continue;
        }
        let sym = |s: &CStr| {
            // SAFETY: `lib` is a live handle from dlopen and `s` is NUL-terminated.
            let p = unsafe { libc::dlsym(lib, s.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        let (
            Some(init),
            Some(header),
            Some(decompress),
            Some(error_str),
            Some(error_code),
            Some(destroy),
        ) = (
            sym(c"tjInitDecompress"),
            sym(c"tjDecompressHeader3"),
            sym(c"tjDecompress2"),
            sym(c"tjGetErrorStr2"),
            sym(c"tjGetErrorCode"),
            sym(c"tjDestroy"),
        )
        else {
            continue;
        };
        // SAFETY: each symbol is the TurboJPEG function of that name, whose C signature is the
        // one of the pointer type it is cast to (turbojpeg.h, API 2.0+).
        return Some(unsafe {
            Api {
                init: std::mem::transmute::<*mut c_void, InitFn>(init),
                header: std::mem::transmute::<*mut c_void, HeaderFn>(header),
                decompress: std::mem::transmute::<*mut c_void, DecompressFn>(decompress),
                error_str: std::mem::transmute::<*mut c_void, ErrorStrFn>(error_str),
                error_code: std::mem::transmute::<*mut c_void, ErrorCodeFn>(error_code),
                destroy: std::mem::transmute::<*mut c_void, DestroyFn>(destroy),
            }
        });
    }
    None
}

fn api() -> Option<&'static Api> {
    API.get_or_init(load).as_ref()
}

/// Whether libturbojpeg could be loaded (JPEG decoding is then Pillow-exact).
pub fn available() -> bool {
    api().is_some()
}

/// Colour layout of a decoded JPEG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Gray,
    Rgb,
    /// CMYK as stored in the file (Adobe files store it inverted).
    Cmyk,
}

impl Layout {
    pub fn channels(self) -> usize {
        match self {
            Layout::Gray => 1,
            Layout::Rgb => 3,
            Layout::Cmyk => 4,
        }
    }
}

/// A decompressor handle, destroyed on drop.
struct Decompressor<'a> {
    api: &'a Api,
    handle: Handle,
}

impl Drop for Decompressor<'_> {
    fn drop(&mut self) {
        // SAFETY: `handle` came from tjInitDecompress and is destroyed exactly once.
        unsafe { (self.api.destroy)(self.handle) };
    }
}

impl Decompressor<'_> {
    fn error(&self) -> String {
        // SAFETY: the handle is live; tjGetErrorStr2 returns a NUL-terminated string owned by the
        // library (valid until the next call on this handle), copied out at once.
        unsafe {
            let p = (self.api.error_str)(self.handle);
            if p.is_null() {
                "unknown libjpeg-turbo error".to_owned()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }
}

/// The header of a JPEG: width, height and layout, or the library's error.
pub struct Header {
    pub width: usize,
    pub height: usize,
    pub layout: Layout,
}

fn open(api: &Api) -> Result<Decompressor<'_>, String> {
    // SAFETY: no preconditions; a null handle is handled below.
    let handle = unsafe { (api.init)() };
    if handle.is_null() {
        return Err("libjpeg-turbo could not create a decompressor".into());
    }
    Ok(Decompressor { api, handle })
}

fn header_of(d: &Decompressor<'_>, bytes: &[u8]) -> Result<Header, String> {
    let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
    let len = c_ulong::try_from(bytes.len()).map_err(|_| "file too large".to_string())?;
    // SAFETY: `bytes` is valid for `len` bytes; the four out-pointers are live locals.
    let rc = unsafe {
        (d.api.header)(
            d.handle,
            bytes.as_ptr(),
            len,
            &mut w,
            &mut h,
            &mut sub,
            &mut cs,
        )
    };
    if rc != 0 {
        return Err(d.error());
    }
    if w <= 0 || h <= 0 {
        return Err(format!("invalid JPEG size {w}x{h}"));
    }
    let layout = match cs {
        TJCS_GRAY => Layout::Gray,
        TJCS_CMYK | TJCS_YCCK => Layout::Cmyk,
        _ => Layout::Rgb,
    };
    Ok(Header {
        width: w as usize,
        height: h as usize,
        layout,
    })
}

/// Reads the header; `None` when the library is not available.
pub fn header(bytes: &[u8]) -> Option<Result<Header, String>> {
    let api = api()?;
    Some(open(api).and_then(|d| header_of(&d, bytes)))
}

/// Decodes `bytes` (whose header was read and size-checked by the caller) into tight rows.
/// `None` when the library is not available.
pub fn decode(bytes: &[u8], header: &Header) -> Option<Result<Vec<u8>, String>> {
    let api = api()?;
    Some((|| {
        let d = open(api)?;
        let check = header_of(&d, bytes)?;
        if (check.width, check.height) != (header.width, header.height) {
            return Err("JPEG header changed between reads".into());
        }
        let channels = header.layout.channels();
        let pitch = header.width * channels;
        let mut out = vec![0u8; pitch * header.height];
        let format = match header.layout {
            Layout::Gray => TJPF_GRAY,
            Layout::Rgb => TJPF_RGB,
            Layout::Cmyk => TJPF_CMYK,
        };
        let len = c_ulong::try_from(bytes.len()).map_err(|_| "file too large".to_string())?;
        let dims = |v: usize| c_int::try_from(v).map_err(|_| "JPEG too large".to_string());
        // SAFETY: `bytes` is valid for `len` bytes; `out` holds `pitch * height` bytes, exactly what
        // tjDecompress2 writes for this width, pitch, height and pixel format.
        let rc = unsafe {
            (api.decompress)(
                d.handle,
                bytes.as_ptr(),
                len,
                out.as_mut_ptr(),
                dims(header.width)?,
                dims(pitch)?,
                dims(header.height)?,
                format,
                0,
            )
        };
        if rc != 0 {
            let message = d.error();
            // SAFETY: the handle is live.
            let code = unsafe { (api.error_code)(d.handle) };
            // Pillow fails on truncated files and accepts libjpeg's other warnings.
            if code != TJERR_WARNING || message.contains("Premature end") {
                return Err(if message.contains("Premature end") {
                    "file is truncated".into()
                } else {
                    message
                });
            }
        }
        Ok(out)
    })())
}
