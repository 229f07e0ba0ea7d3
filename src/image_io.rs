//! Image files → pixels the way Pillow sees them, and → model input the way the reference does.
//!
//! Input: a PNG, JPEG or BMP file. Output: a [`DecodedImage`] in Pillow's mode for that file
//! (`Image.open(path).mode`), and from it either the model input
//! ([`DecodedImage::to_model_input`]: resize **in the image's own mode** to `size × size`, then
//! convert to RGB, then `ToTensor` + `Normalize`, exactly the reference's order) or plain RGB at the
//! original resolution ([`DecodedImage::to_rgb`], for overlays).
//!
//! Modes, as Pillow opens them:
//! - `1` (1-bit grayscale PNG, black/white BMP): resized with nearest, like Pillow.
//! - `L`, `RGB`: resized with Pillow's bicubic (`preprocess::Resizer`, bit-exact).
//! - `LA`, `RGBA`: Pillow premultiplies alpha (`RGBa`/`La`, `c·a/255` rounded), resizes,
//!   un-premultiplies (`255·c/a`, truncated, clipped; kept as is where `a` is 0 or 255) and only
//!   then drops alpha, so fully transparent areas come out black. 16-bit LA PNGs open as RGBA in
//!   Pillow; the result is the same as LA.
//! - `P` (palette PNG/BMP): nearest on the indices, then palette lookup (indices past the palette
//!   are black, as in Pillow).
//! - `I;16` (16-bit grayscale PNG): Pillow keeps 16 bits, resizes with `f64` weights and rounding,
//!   and its conversion to RGB **clips** at 255 instead of scaling (a typical 16-bit image comes out
//!   nearly white). We reproduce that, so scores match the reference; convert such images to 8 bits
//!   beforehand if that is not what you want.
//! - 16-bit RGB/RGBA/LA PNGs keep the high byte of each sample (Pillow's `RGB;16B` unpacking).
//! - `tRNS` transparency of L/RGB/P PNGs is ignored, as in Pillow's `convert("RGB")`.
//! - `CMYK` (4-component JPEG): inverted on load like Pillow's `CMYK;I`, resized with 4 plain
//!   channels, converted with Pillow's `cmyk2rgb`.
//! - EXIF orientation is ignored, as in the reference.
//!
//! Decoders: PNG with the `png` crate (samples as stored); BMP with our own reader of Pillow's
//! rules (`bmp.rs`: palette → `1`/`L`/`P`, 16/24/32 bits, bitfields, RLE4/RLE8); JPEG with
//! libjpeg-turbo's TurboJPEG API loaded at run time (`turbojpeg.rs`, Debian `libturbojpeg0`), which
//! gives Pillow's pixels exactly. Without that library [`jpeg_decoder`] reports the fallback, the
//! `image` crate (zune-jpeg): up to ±4 levels per sample on 4:2:0 files, model input |Δ| up to 0.06
//! (measured by `tests/image_io.rs`).
//!
//! Failure modes ([`ImageError`], one line naming the file): unreadable path, not a regular file
//! (a FIFO or a device is refused without being read, see [`crate::fsio`]), a file over
//! [`crate::fsio::MAX_IMAGE_FILE`] (refused before reading), empty file, not an
//! image / unsupported format or layout, truncated or corrupt data, and images over
//! [`MAX_PIXELS`] (Pillow's own `DecompressionBombError` threshold, 2 × 89,478,485 pixels: a
//! 12000×12000 image, 144 MP, is accepted and costs 432 MB as RGB, 576 MB as RGBA plus a
//! premultiplied copy while resizing). The size is checked from the header before any pixel
//! buffer is allocated. Decoding never panics on file contents (fallback-decoder panics are caught
//! and reported as corrupt data).

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::preprocess::{Filter, PreprocessError, Resizer, normalisation_table};

mod bmp;
mod turbojpeg;

/// Which JPEG decoder this process uses (see [`jpeg_decoder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JpegDecoder {
    /// libjpeg-turbo through `libturbojpeg.so.0`: Pillow's pixels exactly.
    LibjpegTurbo,
    /// The `image` crate (zune-jpeg), used when libturbojpeg is not installed: differs from
    /// Pillow by up to ±4 levels per sample on 4:2:0 files (model input |Δ| up to ~0.06).
    ImageCrate,
}

/// The JPEG decoder in use: libjpeg-turbo when `libturbojpeg.so.0` can be loaded (Debian package
/// `libturbojpeg0`), else the `image` crate. Log it at start-up.
pub fn jpeg_decoder() -> JpegDecoder {
    if turbojpeg::available() {
        JpegDecoder::LibjpegTurbo
    } else {
        JpegDecoder::ImageCrate
    }
}

/// Largest accepted image, in pixels: Pillow's `DecompressionBombError` threshold
/// (`2 * Image.MAX_IMAGE_PIXELS`).
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Why an image could not be loaded or converted. Messages are one line and name the file.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The path could not be opened or read.
    #[error("cannot read image {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a regular file (FIFO, device, directory…), or over [`crate::fsio::MAX_IMAGE_FILE`].
    #[error(transparent)]
    File(crate::fsio::FsioError),
    /// The file has no bytes.
    #[error("image {path} is an empty file")]
    Empty { path: PathBuf },
    /// Not a PNG, JPEG or BMP file.
    #[error("image {path}: unsupported format ({what}); PNG, JPEG and BMP are supported")]
    Unsupported { path: PathBuf, what: String },
    /// Corrupt or truncated data.
    #[error("image {path} is corrupt or truncated: {message}")]
    Decode { path: PathBuf, message: String },
    /// Over [`MAX_PIXELS`].
    #[error(
        "image {path} is {width}x{height} ({} megapixels), over the limit of {} megapixels",
        (*width as u64 * *height as u64) / 1_000_000,
        MAX_PIXELS / 1_000_000
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    /// Raw pixels that do not match their stated geometry ([`DecodedImage::from_raw`]).
    #[error("raw image: {0}")]
    Raw(String),
    /// A conversion could not run (empty target size, short output buffer).
    #[error("image conversion: {0}")]
    Convert(#[from] PreprocessError),
}

/// Pillow's image mode of a decoded file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `1`: bilevel, stored one byte per pixel as 0 or 255.
    Bilevel,
    /// `L`: 8-bit grayscale.
    L,
    /// `LA`: grayscale + alpha, interleaved.
    LA,
    /// `RGB`.
    Rgb,
    /// `RGBA`, straight (not premultiplied) alpha.
    Rgba,
    /// `P`: one palette index per pixel, palette of 256 RGB entries.
    P,
    /// `I;16`: 16-bit grayscale, stored little-endian, two bytes per pixel.
    I16,
    /// `CMYK` (4-component JPEG), stored the way Pillow holds it (Adobe-inverted on load).
    Cmyk,
}

impl Mode {
    /// Bytes per pixel in [`DecodedImage::data`].
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            Mode::Bilevel | Mode::L | Mode::P => 1,
            Mode::LA | Mode::I16 => 2,
            Mode::Rgb => 3,
            Mode::Rgba | Mode::Cmyk => 4,
        }
    }

    /// Pillow's name of the mode.
    pub fn pillow_name(self) -> &'static str {
        match self {
            Mode::Bilevel => "1",
            Mode::L => "L",
            Mode::LA => "LA",
            Mode::Rgb => "RGB",
            Mode::Rgba => "RGBA",
            Mode::P => "P",
            Mode::I16 => "I;16",
            Mode::Cmyk => "CMYK",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.pillow_name())
    }
}

/// A decoded image in Pillow's mode: tight rows, `mode.bytes_per_pixel()` bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedImage {
    width: usize,
    height: usize,
    mode: Mode,
    data: Vec<u8>,
    palette: Option<Vec<[u8; 3]>>,
}

/// File formats we decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Bmp,
}

fn sniff(bytes: &[u8]) -> Result<Format, String> {
    const SIGNATURES: &[(&[u8], &str)] = &[
        (b"GIF8", "GIF"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"\0\0\x01\0", "ICO"),
        (b"%PDF", "PDF"),
        (b"\xff\x0a", "JPEG XL"),
        (b"\0\0\0\x0cjP", "JPEG 2000"),
    ];
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(Format::Png);
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Ok(Format::Jpeg);
    }
    if bytes.starts_with(b"BM") && bytes.len() >= 26 {
        return Ok(Format::Bmp);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Err("WebP".into());
    }
    for (sig, name) in SIGNATURES {
        if bytes.starts_with(sig) {
            return Err((*name).into());
        }
    }
    Err("not an image file".into())
}

/// Loads `path` as Pillow would open it (see the module doc for modes and limits).
pub fn load_image(path: impl AsRef<Path>) -> Result<DecodedImage, ImageError> {
    let path = path.as_ref();
    let bytes = crate::fsio::read_limited(path, crate::fsio::MAX_IMAGE_FILE, "image").map_err(
        |e| match e {
            crate::fsio::FsioError::Open { path, source, .. }
            | crate::fsio::FsioError::Read { path, source, .. } => ImageError::Io { path, source },
            other => ImageError::File(other),
        },
    )?;
    decode_image(&bytes, path)
}

/// Decodes image bytes; `path` is only used in error messages.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<DecodedImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
        });
    }
    let format = sniff(bytes).map_err(|what| ImageError::Unsupported {
        path: path.to_path_buf(),
        what,
    })?;
    let fail = |message: String| ImageError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let check = |width: u32, height: u32| {
        if u64::from(width) * u64::from(height) > MAX_PIXELS {
            Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                width,
                height,
            })
        } else if width == 0 || height == 0 {
            Err(fail(format!("empty image size {width}x{height}")))
        } else {
            Ok(())
        }
    };
    match format {
        Format::Png => decode_png(bytes, &check).map_err(|e| e.into_error(path)),
        Format::Jpeg => decode_jpeg(bytes, &check).map_err(|e| e.into_error(path)),
        Format::Bmp => decode_bmp(bytes, &check).map_err(|e| e.into_error(path)),
    }
}

/// Errors inside a decoder, before the path is attached.
enum DecodeFailure {
    Limit(ImageError),
    Message(String),
}

impl DecodeFailure {
    fn into_error(self, path: &Path) -> ImageError {
        match self {
            DecodeFailure::Limit(e) => e,
            DecodeFailure::Message(message) => ImageError::Decode {
                path: path.to_path_buf(),
                message,
            },
        }
    }
}

impl From<ImageError> for DecodeFailure {
    fn from(e: ImageError) -> Self {
        DecodeFailure::Limit(e)
    }
}

fn msg(e: impl fmt::Display) -> DecodeFailure {
    DecodeFailure::Message(e.to_string())
}

type Check<'a> = &'a dyn Fn(u32, u32) -> Result<(), ImageError>;

/// Unpacks `bits`-bit samples (1, 2, 4) of one row, most significant bits first.
fn unpack_row(row: &[u8], bits: usize, count: usize, out: &mut Vec<u8>) {
    let per_byte = 8 / bits;
    let mask = (1u8 << bits) - 1;
    for i in 0..count {
        let byte = row.get(i / per_byte).copied().unwrap_or(0);
        let shift = 8 - bits * (i % per_byte + 1);
        out.push((byte >> shift) & mask);
    }
}

fn decode_png(bytes: &[u8], check: Check) -> Result<DecodedImage, DecodeFailure> {
    use png::{BitDepth, ColorType, Transformations};
    let limits = png::Limits {
        bytes: usize::try_from(MAX_PIXELS * 8).unwrap_or(usize::MAX),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_transformations(Transformations::IDENTITY);
    decoder.ignore_checksums(false);
    let header = decoder.read_header_info().map_err(msg)?;
    check(header.width, header.height)?;
    let mut reader = decoder.read_info().map_err(msg)?;
    let info = reader.info();
    let (width, height) = (info.width as usize, info.height as usize);
    let (color, depth) = (info.color_type, info.bit_depth);
    let palette = info.palette.as_ref().map(|p| {
        let mut pal = vec![[0u8; 3]; 256];
        for (entry, rgb) in pal.iter_mut().zip(p.chunks_exact(3)) {
            entry.copy_from_slice(rgb);
        }
        pal
    });
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DecodeFailure::Message("image too large for memory".into()))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(msg)?;
    let line = frame.line_size;
    let bits = match depth {
        BitDepth::One => 1,
        BitDepth::Two => 2,
        BitDepth::Four => 4,
        BitDepth::Eight => 8,
        BitDepth::Sixteen => 16,
    };
    let rows = buf.chunks_exact(line).take(height);
    let (mode, data) = match (color, bits) {
        (ColorType::Grayscale, 1) => {
            let mut data = Vec::with_capacity(width * height);
            for row in rows {
                let start = data.len();
                unpack_row(row, 1, width, &mut data);
                data[start..].iter_mut().for_each(|v| *v *= 255);
            }
            (Mode::Bilevel, data)
        }
        (ColorType::Grayscale, 2 | 4) => {
            let scale = if bits == 2 { 85 } else { 17 };
            let mut data = Vec::with_capacity(width * height);
            for row in rows {
                let start = data.len();
                unpack_row(row, bits, width, &mut data);
                data[start..].iter_mut().for_each(|v| *v *= scale);
            }
            (Mode::L, data)
        }
        (ColorType::Indexed, 1 | 2 | 4) => {
            let mut data = Vec::with_capacity(width * height);
            for row in rows {
                unpack_row(row, bits, width, &mut data);
            }
            (Mode::P, data)
        }
        (ColorType::Grayscale, 16) => {
            // Big-endian in the file; stored little-endian like Pillow's I;16.
            let mut data = Vec::with_capacity(width * height * 2);
            for row in rows {
                for s in row[..width * 2].chunks_exact(2) {
                    data.extend_from_slice(&[s[1], s[0]]);
                }
            }
            (Mode::I16, data)
        }
        (color, 8 | 16) => {
            let (mode, channels) = match color {
                ColorType::Grayscale => (Mode::L, 1),
                ColorType::Indexed => (Mode::P, 1),
                ColorType::GrayscaleAlpha => (Mode::LA, 2),
                ColorType::Rgb => (Mode::Rgb, 3),
                ColorType::Rgba => (Mode::Rgba, 4),
            };
            let step = bits / 8;
            let row_bytes = width * channels * step;
            if step == 1 && line == row_bytes {
                // Already tight 8-bit rows: use the decoder's buffer as is (a 12000×12000 RGB
                // file then peaks at one 432 MB buffer instead of two).
                buf.truncate(row_bytes * height);
                (mode, buf)
            } else {
                let mut data = Vec::with_capacity(width * height * channels);
                for row in rows {
                    // 16-bit samples keep their high (first) byte.
                    data.extend(row[..row_bytes].iter().step_by(step));
                }
                (mode, data)
            }
        }
        (color, bits) => {
            return Err(DecodeFailure::Message(format!(
                "invalid PNG color type {color:?} with bit depth {bits}"
            )));
        }
    };
    if data.len() != width * height * mode.bytes_per_pixel() {
        return Err(DecodeFailure::Message("image data is truncated".into()));
    }
    let palette = if mode == Mode::P {
        Some(palette.ok_or_else(|| DecodeFailure::Message("palette image without PLTE".into()))?)
    } else {
        None
    };
    Ok(DecodedImage {
        width,
        height,
        mode,
        data,
        palette,
    })
}

fn decode_jpeg(bytes: &[u8], check: Check) -> Result<DecodedImage, DecodeFailure> {
    if let Some(header) = turbojpeg::header(bytes) {
        let header = header.map_err(DecodeFailure::Message)?;
        let (w, h) = (header.width, header.height);
        check(
            u32::try_from(w).unwrap_or(u32::MAX),
            u32::try_from(h).unwrap_or(u32::MAX),
        )?;
        let mut data = match turbojpeg::decode(bytes, &header) {
            Some(r) => r.map_err(DecodeFailure::Message)?,
            None => return Err(DecodeFailure::Message("libjpeg-turbo vanished".into())),
        };
        let mode = match header.layout {
            turbojpeg::Layout::Gray => Mode::L,
            turbojpeg::Layout::Rgb => Mode::Rgb,
            turbojpeg::Layout::Cmyk => {
                // Pillow reads 4-component JPEGs as "CMYK;I" (Adobe's inverted convention).
                data.iter_mut().for_each(|v| *v = 255 - *v);
                Mode::Cmyk
            }
        };
        return Ok(DecodedImage {
            width: w,
            height: h,
            mode,
            data,
            palette: None,
        });
    }
    // Fallback: the image crate. Third-party decoder panics on hostile data become errors.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_jpeg_image_crate(bytes, check)
    }));
    decoded.unwrap_or_else(|_| {
        Err(DecodeFailure::Message(
            "JPEG decoder failed on this data".into(),
        ))
    })
}

fn decode_jpeg_image_crate(bytes: &[u8], check: Check) -> Result<DecodedImage, DecodeFailure> {
    use image::ImageDecoder;
    let decoder = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes)).map_err(msg)?;
    let (w, h) = decoder.dimensions();
    check(w, h)?;
    let (mode, channels) = match decoder.color_type() {
        image::ColorType::L8 => (Mode::L, 1),
        image::ColorType::Rgb8 => (Mode::Rgb, 3),
        other => {
            return Err(DecodeFailure::Message(format!(
                "unsupported JPEG color type {other:?}"
            )));
        }
    };
    let (width, height) = (w as usize, h as usize);
    let mut data = vec![0u8; width * height * channels];
    decoder.read_image(&mut data).map_err(msg)?;
    Ok(DecodedImage {
        width,
        height,
        mode,
        data,
        palette: None,
    })
}

fn decode_bmp(bytes: &[u8], check: Check) -> Result<DecodedImage, DecodeFailure> {
    let (w, h) = bmp::dimensions(bytes).map_err(DecodeFailure::Message)?;
    check(
        u32::try_from(w).unwrap_or(u32::MAX),
        u32::try_from(h).unwrap_or(u32::MAX),
    )?;
    let b = bmp::decode(bytes).map_err(DecodeFailure::Message)?;
    Ok(DecodedImage {
        width: b.width,
        height: b.height,
        mode: b.mode,
        data: b.data,
        palette: b.palette,
    })
}

/// Pillow's `MULDIV255`: `a·b/255` rounded, with shifts.
#[inline]
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = u32::from(a) * u32::from(b) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's un-premultiplication of one colour sample.
#[inline]
fn unpremultiply(c: u8, a: u8) -> u8 {
    if a == 0 || a == 255 {
        c
    } else {
        ((255 * u32::from(c)) / u32::from(a)).min(255) as u8
    }
}

impl DecodedImage {
    /// Wraps raw pixels (tight rows, `mode.bytes_per_pixel()` bytes each; `P` needs a palette of at
    /// most 256 entries, missing entries are black).
    pub fn from_raw(
        width: usize,
        height: usize,
        mode: Mode,
        data: Vec<u8>,
        palette: Option<Vec<[u8; 3]>>,
    ) -> Result<DecodedImage, ImageError> {
        let need = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(mode.bytes_per_pixel()))
            .ok_or_else(|| ImageError::Raw(format!("size {width}x{height} overflows")))?;
        if data.len() != need {
            return Err(ImageError::Raw(format!(
                "{width}x{height} {mode} needs {need} bytes, got {}",
                data.len()
            )));
        }
        let palette = match (mode, palette) {
            (Mode::P, Some(p)) if p.len() <= 256 => {
                let mut pal = vec![[0u8; 3]; 256];
                pal[..p.len()].copy_from_slice(&p);
                Some(pal)
            }
            (Mode::P, Some(p)) => {
                return Err(ImageError::Raw(format!(
                    "palette of {} entries (256 at most)",
                    p.len()
                )));
            }
            (Mode::P, None) => return Err(ImageError::Raw("P image without a palette".into())),
            (_, _) => None,
        };
        Ok(DecodedImage {
            width,
            height,
            mode,
            data,
            palette,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Pillow's mode of the file.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The pixels in [`Self::mode`] (tight rows).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The 256-entry palette of a `P` image.
    pub fn palette(&self) -> Option<&[[u8; 3]]> {
        self.palette.as_deref()
    }

    /// Converts pixels in this image's mode to RGB (Pillow's `convert("RGB")`).
    fn convert_rgb(&self, data: &[u8], pixels: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(pixels * 3);
        match self.mode {
            Mode::Bilevel | Mode::L => data[..pixels].iter().for_each(|&v| out.extend([v; 3])),
            Mode::LA => data[..pixels * 2]
                .chunks_exact(2)
                .for_each(|p| out.extend([p[0]; 3])),
            Mode::Rgb => out.extend_from_slice(&data[..pixels * 3]),
            Mode::Rgba => data[..pixels * 4]
                .chunks_exact(4)
                .for_each(|p| out.extend_from_slice(&p[..3])),
            Mode::P => {
                let black = [[0u8; 3]; 1];
                let pal = self.palette.as_deref().unwrap_or(&black);
                data[..pixels].iter().for_each(|&i| {
                    out.extend_from_slice(pal.get(i as usize).unwrap_or(&[0; 3]));
                });
            }
            Mode::Cmyk => data[..pixels * 4].chunks_exact(4).for_each(|p| {
                // Pillow's cmyk2rgb.
                let nk = 255 - i32::from(p[3]);
                for &c in &p[..3] {
                    let t = i32::from(c) * nk + 128;
                    out.push((nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8);
                }
            }),
            Mode::I16 => data[..pixels * 2].chunks_exact(2).for_each(|p| {
                // Pillow's I16_RGB clips instead of scaling.
                let v = if p[1] == 0 { p[0] } else { 255 };
                out.extend([v; 3]);
            }),
        }
        out
    }

    /// RGB at the original resolution (tight, `width * height * 3` bytes), as Pillow's
    /// `convert("RGB")`.
    pub fn to_rgb(&self) -> Vec<u8> {
        self.convert_rgb(&self.data, self.width * self.height)
    }

    /// Pillow's `im.resize((dst_w, dst_h), filter).convert("RGB")` on this image: the resize runs in
    /// the image's own mode (nearest for `1` and `P`, premultiplied alpha for `LA`/`RGBA`), the
    /// conversion after it. Returns tight RGB.
    pub fn resize_to_rgb(
        &self,
        dst_w: usize,
        dst_h: usize,
        filter: Filter,
    ) -> Result<Vec<u8>, ImageError> {
        let (w, h) = (self.width, self.height);
        if w == dst_w && h == dst_h {
            // Pillow returns a copy when the size does not change: no premultiplication round trip.
            return Ok(self.to_rgb());
        }
        let filter = match self.mode {
            Mode::Bilevel | Mode::P => Filter::Nearest,
            _ => filter,
        };
        let n = dst_w * dst_h;
        let resized = match self.mode {
            Mode::I16 => resize_i16(&self.data, w, h, dst_w, dst_h, filter)?,
            Mode::LA | Mode::Rgba if filter != Filter::Nearest => {
                let c = self.mode.bytes_per_pixel();
                let mut pre = self.data.clone();
                for px in pre.chunks_exact_mut(c) {
                    let a = px[c - 1];
                    for v in &mut px[..c - 1] {
                        *v = muldiv255(*v, a);
                    }
                }
                let mut out = vec![0u8; n * c];
                Resizer::new(w, h, c, dst_w, dst_h, filter)?.resize(&pre, w * c, &mut out)?;
                for px in out.chunks_exact_mut(c) {
                    let a = px[c - 1];
                    for v in &mut px[..c - 1] {
                        *v = unpremultiply(*v, a);
                    }
                }
                out
            }
            _ => {
                let c = self.mode.bytes_per_pixel();
                let mut out = vec![0u8; n * c];
                Resizer::new(w, h, c, dst_w, dst_h, filter)?.resize(&self.data, w * c, &mut out)?;
                out
            }
        };
        Ok(self.convert_rgb(&resized, n))
    }

    /// The model input exactly as the reference builds it from a file: Pillow bicubic to
    /// `size × size` in the image's own mode, then RGB, then `ToTensor` + `Normalize(mean, std)`,
    /// into `out` (`[3, size, size]` float32, at least `3 * size * size` floats).
    pub fn to_model_input(
        &self,
        size: usize,
        mean: [f32; 3],
        std: [f32; 3],
        out: &mut [f32],
    ) -> Result<(), ImageError> {
        let n = size * size;
        if out.len() < 3 * n {
            return Err(PreprocessError::Buffer {
                got: out.len(),
                need: 3 * n,
            }
            .into());
        }
        let rgb = self.resize_to_rgb(size, size, Filter::Bicubic)?;
        let lut = normalisation_table(mean, std);
        crate::preprocess::chw_with_table(&rgb, n, &lut, out);
        Ok(())
    }
}

/// Pillow's resize of an `I;16` image (little-endian samples): `f64` weights, rounded half away
/// from zero, clipped to 16 bits; nearest as for 8-bit images. Returns little-endian samples.
fn resize_i16(
    data: &[u8],
    w: usize,
    h: usize,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Result<Vec<u8>, ImageError> {
    let src: Vec<u16> = data
        .chunks_exact(2)
        .map(|p| u16::from_le_bytes([p[0], p[1]]))
        .collect();
    let out = crate::preprocess::resize_u16(&src, w, h, dst_w, dst_h, filter)?;
    Ok(out.iter().flat_map(|v| v.to_le_bytes()).collect())
}
