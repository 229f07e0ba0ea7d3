//! Ground-truth masks as the reference evaluation sees them.
//!
//! Input: a mask file and the map size S. Output: `S × S` booleans (row-major), true = defect.
//! Steps, as the official loader: decode and convert to 8-bit gray with Pillow's `convert("L")`
//! rules; binarise `> 0` to 255; resize to S×S with Pillow's BILINEAR (antialiased) resampler;
//! scale by 1/255 and threshold `> 0.5` (i.e. `>= 128`). Failure modes: [`MaskError`] when the
//! file cannot be read (not a regular file, over [`crate::fsio::MAX_MASK_FILE`]: refused before
//! reading) or decoded, or the resizer returns the wrong number of bytes.
//!
//! The resampler is a parameter ([`MaskResizer`]) so the crate's Pillow-exact
//! `preprocess::resize_u8` (single channel, `Filter::Bilinear`) plugs in here; a plain closure
//! with the same arguments works too.

use std::path::{Path, PathBuf};

use image::DynamicImage;

/// Resizes a single-channel 8-bit image (`src` is `width × height`, tightly packed) to
/// `dst_w × dst_h`. Must match Pillow's `Image.resize(..., BILINEAR)` for parity with the
/// reference numbers.
pub trait MaskResizer: Sync {
    /// Returns `dst_w × dst_h` bytes.
    fn resize(
        &self,
        src: &[u8],
        width: usize,
        height: usize,
        dst_w: usize,
        dst_h: usize,
    ) -> Vec<u8>;
}

impl<F> MaskResizer for F
where
    F: Fn(&[u8], usize, usize, usize, usize) -> Vec<u8> + Sync,
{
    fn resize(
        &self,
        src: &[u8],
        width: usize,
        height: usize,
        dst_w: usize,
        dst_h: usize,
    ) -> Vec<u8> {
        self(src, width, height, dst_w, dst_h)
    }
}

/// A mask that could not be turned into a map-sized truth.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// Open or decode failed.
    #[error("cannot read mask {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// The resizer broke its contract.
    #[error("mask resizer returned {got} bytes, expected {expected}")]
    Resizer {
        /// Bytes returned.
        got: usize,
        /// `dst_w × dst_h`.
        expected: usize,
    },
}

/// Pillow's ITU-R 601-2 luma with its fixed-point rounding (`L = (19595 R + 38470 G + 7471 B +
/// 0x8000) >> 16`).
#[inline]
fn pil_l(r: u8, g: u8, b: u8) -> u8 {
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

/// Decoded image → (binary 0/255 gray, width, height), following Pillow's `convert("L")` then
/// `> 0`. 16-bit channels are taken as Pillow reads them (gray clipped at 255: non-zero stays
/// non-zero; RGB from the high byte).
pub fn binarise(img: &DynamicImage) -> (Vec<u8>, usize, usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let on = |v: bool| if v { 255u8 } else { 0 };
    let out: Vec<u8> = match img {
        DynamicImage::ImageLuma8(b) => b.as_raw().iter().map(|&v| on(v > 0)).collect(),
        DynamicImage::ImageLumaA8(b) => b.pixels().map(|p| on(p.0[0] > 0)).collect(),
        DynamicImage::ImageLuma16(b) => b.as_raw().iter().map(|&v| on(v > 0)).collect(),
        DynamicImage::ImageLumaA16(b) => b.pixels().map(|p| on(p.0[0] > 0)).collect(),
        DynamicImage::ImageRgb8(b) => b
            .pixels()
            .map(|p| on(pil_l(p.0[0], p.0[1], p.0[2]) > 0))
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .pixels()
            .map(|p| on(pil_l(p.0[0], p.0[1], p.0[2]) > 0))
            .collect(),
        DynamicImage::ImageRgb16(b) => b
            .pixels()
            .map(|p| {
                let [r, g, bl] = p.0.map(|c| (c >> 8) as u8);
                on(pil_l(r, g, bl) > 0)
            })
            .collect(),
        other => other
            .to_rgb8()
            .pixels()
            .map(|p| on(pil_l(p.0[0], p.0[1], p.0[2]) > 0))
            .collect(),
    };
    (out, w, h)
}

/// Binary 0/255 mask of `width × height` → `size × size` truth (resize, then `>= 128`, which is
/// `v / 255 > 0.5`).
pub fn to_truth(
    binary: &[u8],
    width: usize,
    height: usize,
    size: usize,
    resizer: &dyn MaskResizer,
) -> Result<Vec<bool>, MaskError> {
    let resized;
    let px: &[u8] = if width == size && height == size {
        binary
    } else {
        resized = resizer.resize(binary, width, height, size, size);
        &resized
    };
    if px.len() != size * size {
        return Err(MaskError::Resizer {
            got: px.len(),
            expected: size * size,
        });
    }
    Ok(px.iter().map(|&v| v >= 128).collect())
}

/// Loads a mask file as a `size × size` truth.
pub fn load_mask(
    path: &Path,
    size: usize,
    resizer: &dyn MaskResizer,
) -> Result<Vec<bool>, MaskError> {
    let img = crate::fsio::read_limited(path, crate::fsio::MAX_MASK_FILE, "mask")
        .map_err(|e| e.cause())
        .and_then(|bytes| {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| e.to_string())
        })
        .and_then(|r| r.decode().map_err(|e| e.to_string()))
        .map_err(|message| MaskError::Read {
            path: path.to_owned(),
            message,
        })?;
    let (bin, w, h) = binarise(&img);
    to_truth(&bin, w, h, size, resizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_luma_rounds_like_pillow() {
        // Pillow: Image.new("RGB", (1, 1), (1, 0, 0)).convert("L") is 0; (2, 0, 0) is 1.
        assert_eq!(pil_l(1, 0, 0), 0);
        assert_eq!(pil_l(2, 0, 0), 1);
        assert_eq!(pil_l(255, 255, 255), 255);
        assert_eq!(pil_l(0, 1, 0), 1);
        // checked against Pillow 13: (0, 0, 4) → 0, (0, 0, 5) → 1
        assert_eq!(pil_l(0, 0, 4), 0);
        assert_eq!(pil_l(0, 0, 5), 1);
    }

    #[test]
    fn same_size_skips_the_resizer() {
        let never = |_: &[u8], _: usize, _: usize, _: usize, _: usize| -> Vec<u8> { Vec::new() };
        let t = to_truth(&[0, 255, 255, 0], 2, 2, 2, &never).unwrap();
        assert_eq!(t, vec![false, true, true, false]);
        assert!(matches!(
            to_truth(&[0, 255, 255, 0], 2, 2, 4, &never),
            Err(MaskError::Resizer { got: 0, .. })
        ));
    }
}
