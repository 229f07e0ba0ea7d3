//! BMP decoding with Pillow's rules (`BmpImagePlugin`): which mode a file gets, and its pixels.
//!
//! Input: BMP bytes. Output: width, height, Pillow mode and pixels (palette indices for `P`).
//! - 1/4/8 bits with a palette: `1` when the palette is black/white (2 colours), `L` when it is
//!   the identity gray ramp, else `P`; RLE8/RLE4 compression supported.
//! - 16 bits: 5-5-5 (or 5-6-5 bitfields), expanded as `v·255/31` like Pillow; 24 bits: BGR;
//!   32 bits: BGRX → `RGB` (alpha ignored, as Pillow does), bitfields with an alpha mask → `RGBA`.
//! - Bottom-up and top-down row orders; headers of 12, 40, 52, 56, 64, 108 and 124 bytes.
//!
//! Failure modes (messages without the path; `image_io` adds it): truncated header, palette or
//! pixel data, unsupported header/depth/compression/bitfields, RLE data that stops early (Pillow
//! fails there too). Never panics on file contents: every read is bounds-checked.
//!
//! Known difference: gray-palette files whose depth Pillow misreads (4-bit gray palettes, 8-bit
//! files with a black/white palette, RLE files with a black/white palette) get the palette's gray
//! values here.

use super::Mode;

/// A decoded BMP in Pillow's mode.
pub struct Bmp {
    pub width: usize,
    pub height: usize,
    pub mode: Mode,
    pub data: Vec<u8>,
    pub palette: Option<Vec<[u8; 3]>>,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, String> {
    b.get(o..o + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| "BMP header is truncated".to_string())
}

fn u32_at(b: &[u8], o: usize) -> Result<u32, String> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "BMP header is truncated".to_string())
}

/// Width and height from the header, for the size check before any allocation.
pub fn dimensions(b: &[u8]) -> Result<(u64, u64), String> {
    let header_size = u32_at(b, 14)?;
    if header_size == 12 {
        return Ok((u64::from(u16_at(b, 18)?), u64::from(u16_at(b, 20)?)));
    }
    let width = u32_at(b, 18)?;
    // The width is a signed field that must be positive (a negative height means top-down).
    if width == 0 || width > i32::MAX as u32 {
        return Err(format!(
            "corrupt BMP header: width {} (expected a positive number)",
            width as i32
        ));
    }
    let raw_h = u32_at(b, 22)?;
    let height = if raw_h >> 24 == 0xFF {
        (1u64 << 32) - u64::from(raw_h)
    } else {
        u64::from(raw_h)
    };
    Ok((u64::from(width), height))
}

/// How the pixel bytes of one row turn into samples.
#[derive(Clone, Copy)]
enum Raw {
    Indexed(u16),
    Bgr15,
    Bgr16,
    Bgr,
    /// 32 bits: byte positions of R, G, B and optionally A.
    Bytes4([usize; 3], Option<usize>),
}

/// Decodes a BMP file (`b` starts with `BM`). The caller has checked the dimensions.
pub fn decode(b: &[u8]) -> Result<Bmp, String> {
    let offset = u32_at(b, 10)? as usize;
    let header_size = u32_at(b, 14)? as usize;
    let mut pos = 14 + header_size;
    let (width, height) = dimensions(b)?;
    let (width, height) = (width as usize, height as usize);
    let (bits, compression, mut colors, padding, top_down) = if header_size == 12 {
        (u16_at(b, 24)?, 0u32, 0u32, 3usize, false)
    } else if matches!(header_size, 40 | 52 | 56 | 64 | 108 | 124) {
        (
            u16_at(b, 28)?,
            u32_at(b, 30)?,
            u32_at(b, 46)?,
            4usize,
            u32_at(b, 22)? >> 24 == 0xFF,
        )
    } else {
        return Err(format!("unsupported BMP header size {header_size}"));
    };
    if b.len() < 14 + header_size {
        return Err("BMP header is truncated".into());
    }
    if width == 0 || height == 0 {
        return Err(format!("empty image size {width}x{height}"));
    }
    let masks = if compression == 3 {
        let m = if header_size >= 52 {
            let a = if header_size >= 56 { u32_at(b, 66)? } else { 0 };
            [u32_at(b, 54)?, u32_at(b, 58)?, u32_at(b, 62)?, a]
        } else {
            let m = [u32_at(b, pos)?, u32_at(b, pos + 4)?, u32_at(b, pos + 8)?, 0];
            pos += 12;
            m
        };
        Some(m)
    } else {
        None
    };
    if colors == 0 {
        colors = 1u32.checked_shl(u32::from(bits)).unwrap_or(0);
    }
    let mut data_offset = offset;
    if offset == 14 + header_size && bits <= 8 {
        data_offset += padding * colors as usize;
    }
    let raw = match (bits, masks) {
        (1 | 4 | 8, None) => Raw::Indexed(bits),
        (16, None) => Raw::Bgr15,
        (24, None) => Raw::Bgr,
        (32, None) => Raw::Bytes4([2, 1, 0], None),
        (16, Some([0xF800, 0x7E0, 0x1F, _])) => Raw::Bgr16,
        (16, Some([0x7C00, 0x3E0, 0x1F, _])) => Raw::Bgr15,
        (24, Some([0xFF0000, 0xFF00, 0xFF, _])) => Raw::Bgr,
        (32, Some([0, 0, 0, 0])) => Raw::Bytes4([2, 1, 0], Some(3)),
        (32, Some(m)) => {
            const SUPPORTED: [[u32; 4]; 7] = [
                [0xFF0000, 0xFF00, 0xFF, 0x0],
                [0xFF000000, 0xFF0000, 0xFF00, 0x0],
                [0xFF000000, 0xFF00, 0xFF, 0x0],
                [0xFF000000, 0xFF0000, 0xFF00, 0xFF],
                [0xFF, 0xFF00, 0xFF0000, 0xFF000000],
                [0xFF0000, 0xFF00, 0xFF, 0xFF000000],
                [0xFF000000, 0xFF00, 0xFF, 0xFF0000],
            ];
            if !SUPPORTED.contains(&m) {
                return Err("unsupported BMP bitfields layout".into());
            }
            let byte = |mask: u32| (mask.trailing_zeros() / 8) as usize;
            Raw::Bytes4(
                [byte(m[0]), byte(m[1]), byte(m[2])],
                (m[3] != 0).then(|| byte(m[3])),
            )
        }
        (1 | 4 | 8 | 16 | 24, Some(_)) => return Err("unsupported BMP bitfields layout".into()),
        (bits, _) => return Err(format!("unsupported BMP pixel depth {bits}")),
    };
    let rle = match compression {
        0 | 3 => None,
        1 | 2 if bits <= 8 => Some(compression == 2),
        c => return Err(format!("unsupported BMP compression {c}")),
    };

    // Palette (1/4/8 bits): Pillow drops it when it is black/white or the identity gray ramp.
    let mut mode_palette = None;
    if let Raw::Indexed(_) = raw {
        if !(1..=65536).contains(&colors) {
            return Err(format!("unsupported BMP palette size {colors}"));
        }
        let n = colors as usize;
        let bytes = b
            .get(pos..pos + padding * n)
            .ok_or_else(|| "BMP palette is truncated".to_string())?;
        let entries: Vec<[u8; 3]> = bytes
            .chunks_exact(padding)
            .map(|e| [e[2], e[1], e[0]])
            .collect();
        let gray = if n == 2 {
            entries[0] == [0; 3] && entries[1] == [255; 3]
        } else {
            entries
                .iter()
                .enumerate()
                .all(|(i, e)| i < 256 && *e == [i as u8; 3])
        };
        let mode = if gray {
            if n <= 2 { Mode::Bilevel } else { Mode::L }
        } else {
            Mode::P
        };
        let mut pal = vec![[0u8; 3]; 256];
        for (p, e) in pal.iter_mut().zip(&entries) {
            *p = *e;
        }
        mode_palette = Some((mode, pal));
    }

    let pixels = b
        .get(data_offset..)
        .ok_or_else(|| "BMP pixel data is missing".to_string())?;
    let (mode, channels) = match (raw, &mode_palette) {
        (Raw::Indexed(_), Some((m, _))) => (*m, 1),
        (Raw::Bytes4(_, Some(_)), _) => (Mode::Rgba, 4),
        _ => (Mode::Rgb, 3),
    };
    let row_len = width * channels;
    // Raw data must be all there before the pixel buffer is allocated.
    let bits_usize = usize::from(bits);
    let stride = ((width * bits_usize + 31) >> 3) & !3;
    let line = (width * bits_usize).div_ceil(8);
    if rle.is_none() && pixels.len() < stride * (height - 1) + line {
        return Err("BMP pixel data is truncated".into());
    }
    let mut data = vec![0u8; row_len * height];
    // File row r goes to image row `dest(r)`.
    let dest = |r: usize| if top_down { r } else { height - 1 - r };

    if let Some(rle4) = rle {
        let indices = decode_rle(pixels, data_offset, width, height, rle4)?;
        for (r, row) in indices.chunks_exact(width).enumerate() {
            data[dest(r) * row_len..][..row_len].copy_from_slice(row);
        }
    } else {
        for r in 0..height {
            let src = &pixels[r * stride..r * stride + line];
            let out = &mut data[dest(r) * row_len..][..row_len];
            unpack(raw, src, out);
        }
    }

    let palette = match mode_palette {
        Some((Mode::P, pal)) => Some(pal),
        Some((_, pal)) => {
            // `1` and `L`: the palette is the gray value itself.
            for v in &mut data {
                *v = pal[*v as usize][0];
            }
            None
        }
        None => None,
    };
    Ok(Bmp {
        width,
        height,
        mode,
        data,
        palette,
    })
}

fn unpack(raw: Raw, src: &[u8], out: &mut [u8]) {
    match raw {
        Raw::Indexed(8) => out.copy_from_slice(&src[..out.len()]),
        Raw::Indexed(bits) => {
            let bits = bits as usize;
            let per = 8 / bits;
            let mask = (1u8 << bits) - 1;
            for (i, o) in out.iter_mut().enumerate() {
                *o = (src[i / per] >> (8 - bits * (i % per + 1))) & mask;
            }
        }
        Raw::Bgr15 | Raw::Bgr16 => {
            for (o, p) in out.chunks_exact_mut(3).zip(src.chunks_exact(2)) {
                let v = u32::from(p[0]) | (u32::from(p[1]) << 8);
                let (r, g) = if matches!(raw, Raw::Bgr16) {
                    (((v >> 11) & 31) * 255 / 31, ((v >> 5) & 63) * 255 / 63)
                } else {
                    (((v >> 10) & 31) * 255 / 31, ((v >> 5) & 31) * 255 / 31)
                };
                o[0] = r as u8;
                o[1] = g as u8;
                o[2] = ((v & 31) * 255 / 31) as u8;
            }
        }
        Raw::Bgr => {
            for (o, p) in out.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
                o.copy_from_slice(&[p[2], p[1], p[0]]);
            }
        }
        Raw::Bytes4([r, g, b], alpha) => {
            let c = if alpha.is_some() { 4 } else { 3 };
            for (o, p) in out.chunks_exact_mut(c).zip(src.chunks_exact(4)) {
                o[0] = p[r];
                o[1] = p[g];
                o[2] = p[b];
                if let Some(a) = alpha {
                    o[3] = p[a];
                }
            }
        }
    }
}

/// RLE8/RLE4 as Pillow's `BmpRleDecoder` reads it (`base`: file offset of `src`): indices in file
/// row order. Data that ends
/// before every pixel is set is an error (Pillow: "not enough image data").
fn decode_rle(
    src: &[u8],
    base: usize,
    width: usize,
    height: usize,
    rle4: bool,
) -> Result<Vec<u8>, String> {
    let total = width * height;
    let mut data: Vec<u8> = Vec::new();
    let mut x = 0usize;
    let mut i = 0usize;
    while data.len() < total {
        let (Some(&count), Some(&byte)) = (src.get(i), src.get(i + 1)) else {
            break;
        };
        i += 2;
        if count != 0 {
            let n = (count as usize).min(width.saturating_sub(x));
            for k in 0..n {
                let v = if !rle4 {
                    byte
                } else if k % 2 == 0 {
                    byte >> 4
                } else {
                    byte & 0x0F
                };
                data.push(v);
            }
            x += n;
            continue;
        }
        match byte {
            0 => {
                while !data.len().is_multiple_of(width) {
                    data.push(0);
                }
                x = 0;
            }
            1 => break,
            2 => {
                let (Some(&right), Some(&up)) = (src.get(i), src.get(i + 1)) else {
                    break;
                };
                i += 2;
                let skip = (right as usize + up as usize * width).min(total - data.len());
                data.resize(data.len() + skip, 0);
                x = data.len() % width;
            }
            n => {
                let count = (n as usize).min(total - data.len());
                let byte_count = if rle4 { count.div_ceil(2) } else { count };
                let avail = &src[i.min(src.len())..(i + byte_count).min(src.len())];
                if rle4 {
                    for (k, &v) in avail.iter().enumerate() {
                        data.push(v >> 4);
                        if k * 2 + 1 < count {
                            data.push(v & 0x0F);
                        }
                    }
                } else {
                    data.extend_from_slice(avail);
                }
                i += byte_count;
                if avail.len() < byte_count || data.len() == total {
                    break;
                }
                x += n as usize;
                // Pillow aligns to 16-bit words of the file position.
                if !(base + i).is_multiple_of(2) {
                    i += 1;
                }
            }
        }
    }
    if data.len() < total {
        return Err("not enough BMP image data (RLE stream ends early)".into());
    }
    data.truncate(total);
    Ok(data)
}
