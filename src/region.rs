//! Regions of interest: the geometry of a camera's named regions — the rectangle cropped from the
//! full-resolution frame and the ignore polygons inside it — and nothing else (a leaf).
//!
//! Input: a [`RegionShape`] as the configuration resolved it (a rectangle in fractions of the
//! frame or in pixels, polygons in the same units and frame coordinates) and, at run time, the
//! frame's size. Output: the [`PixelRect`] to crop ([`RegionShape::pixel_rect`]), the map pixels
//! to ignore on the model's `size × size` map of that crop ([`ignore_mask`]), a canonical text of
//! the shape for calibration fingerprints ([`RegionShape::canonical`]). Failure modes: a
//! rectangle that does not fit the frame it is applied to (a camera whose frame size changed at
//! run time) is a [`RegionError`] for that frame — the daemon reports the region, it never
//! panics; everything else (zero area, polygons outside the rectangle or self-intersecting) is
//! refused when the configuration is read ([`RegionShape::validate`]).
//!
//! Polygons use the even–odd rule on the map pixels' centres; self-intersecting polygons are
//! refused rather than given a meaning. The tests in this file is checked with hand-computed
//! cases; the two algorithms (ray casting, segment intersection by orientation signs) are the
//! textbook ones and small enough not to need a geometry crate (see docs/decisions.md).

use std::fmt;

use thiserror::Error;

/// Units of a rectangle and its polygons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Units {
    /// Fractions of the frame's width and height, in [0, 1].
    Fraction,
    /// Pixels of the full-resolution frame.
    Pixel,
}

/// A region's shape as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionShape {
    pub units: Units,
    /// x, y, width, height.
    pub rect: [f64; 4],
    /// Ignore polygons, each at least three points, in frame coordinates of `units`.
    pub ignore: Vec<Vec<[f64; 2]>>,
}

/// A rectangle in pixels of one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// A region that does not fit the frame it is applied to.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    #[error("region {rect} does not fit the {width}x{height} frame")]
    OutsideFrame {
        rect: String,
        width: u32,
        height: u32,
    },
    #[error("region {rect} is less than one pixel of the {width}x{height} frame")]
    Empty {
        rect: String,
        width: u32,
        height: u32,
    },
}

impl fmt::Display for Units {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Units::Fraction => "frac",
            Units::Pixel => "px",
        })
    }
}

impl RegionShape {
    /// The whole frame (a camera without regions).
    pub fn full() -> Self {
        Self {
            units: Units::Fraction,
            rect: [0.0, 0.0, 1.0, 1.0],
            ignore: Vec::new(),
        }
    }

    /// Whether this is the whole frame without ignore polygons.
    pub fn is_full(&self) -> bool {
        *self == Self::full()
    }

    /// Canonical text of the rectangle (`frac:x,y,w,h` / `px:x,y,w,h`), for fingerprints.
    pub fn canonical(&self) -> String {
        let [x, y, w, h] = self.rect;
        format!("{}:{x},{y},{w},{h}", self.units)
    }

    /// Canonical text of the ignore polygons (empty when none), for fingerprints.
    pub fn canonical_ignore(&self) -> String {
        self.ignore
            .iter()
            .map(|p| {
                p.iter()
                    .map(|[x, y]| format!("{x},{y}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Checks the shape on its own: finite numbers, positive size, inside the unit square for
    /// fractions, polygons of at least 3 points inside the rectangle and not self-intersecting.
    /// Returns one message per problem (the config reports them at the region's line).
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        let [x, y, w, h] = self.rect;
        let key = match self.units {
            Units::Fraction => "rect",
            Units::Pixel => "rect_px",
        };
        if self.rect.iter().any(|v| !v.is_finite()) {
            out.push(format!("{key}: every value must be a finite number"));
            return out;
        }
        if x < 0.0 || y < 0.0 {
            out.push(format!("{key}: x and y must be >= 0, got {x}, {y}"));
        }
        if w <= 0.0 || h <= 0.0 {
            out.push(format!(
                "{key}: width and height must be > 0 (a region of zero area), got {w} x {h}"
            ));
        }
        match self.units {
            Units::Fraction => {
                if x + w > 1.0 + 1e-9 || y + h > 1.0 + 1e-9 {
                    out.push(format!(
                        "rect: [{x}, {y}, {w}, {h}] reaches outside the frame (x + width and y + height must be <= 1)"
                    ));
                }
            }
            Units::Pixel => {
                if self.rect.iter().any(|v| v.fract() != 0.0) {
                    out.push(format!(
                        "rect_px: values must be whole pixels, got {:?}",
                        self.rect
                    ));
                }
                if w > 0.0 && h > 0.0 && (w < 1.0 || h < 1.0) {
                    out.push("rect_px: a region must be at least 1 x 1 pixels".into());
                }
            }
        }
        for (i, poly) in self.ignore.iter().enumerate() {
            if poly.len() < 3 {
                out.push(format!(
                    "ignore[{i}]: a polygon needs at least 3 points, got {}",
                    poly.len()
                ));
                continue;
            }
            if poly.iter().flatten().any(|v| !v.is_finite()) {
                out.push(format!(
                    "ignore[{i}]: every coordinate must be a finite number"
                ));
                continue;
            }
            if let Some([px, py]) = poly
                .iter()
                .find(|[px, py]| *px < x || *py < y || *px > x + w || *py > y + h)
            {
                out.push(format!(
                    "ignore[{i}]: point [{px}, {py}] is outside the region's rectangle [{x}, {y}, {w}, {h}]"
                ));
            }
            if let Some((a, b)) = self_intersection(poly) {
                out.push(format!(
                    "ignore[{i}]: the polygon intersects itself (edges {a} and {b} cross); draw it without crossings"
                ));
            }
        }
        out
    }

    /// The pixel rectangle of this region in a `width × height` frame. Fractions are rounded
    /// to the nearest pixel edge.
    pub fn pixel_rect(&self, width: u32, height: u32) -> Result<PixelRect, RegionError> {
        let [x, y, w, h] = self.rect;
        let (fw, fh) = (f64::from(width), f64::from(height));
        let (x0, y0, x1, y1) = match self.units {
            Units::Fraction => (
                (x * fw).round(),
                (y * fh).round(),
                ((x + w) * fw).round().min(fw),
                ((y + h) * fh).round().min(fh),
            ),
            Units::Pixel => (x, y, x + w, y + h),
        };
        if x1 > fw || y1 > fh || x0 < 0.0 || y0 < 0.0 {
            return Err(RegionError::OutsideFrame {
                rect: self.canonical(),
                width,
                height,
            });
        }
        if x1 - x0 < 1.0 || y1 - y0 < 1.0 {
            return Err(RegionError::Empty {
                rect: self.canonical(),
                width,
                height,
            });
        }
        // In range of u32: bounded by the frame's own u32 size above.
        Ok(PixelRect {
            x: x0 as u32,
            y: y0 as u32,
            w: (x1 - x0) as u32,
            h: (y1 - y0) as u32,
        })
    }

    /// The polygons in pixel coordinates of the crop `r` of a `width × height` frame.
    fn polygons_in_crop(&self, r: PixelRect, width: u32, height: u32) -> Vec<Vec<[f64; 2]>> {
        let (sx, sy) = match self.units {
            Units::Fraction => (f64::from(width), f64::from(height)),
            Units::Pixel => (1.0, 1.0),
        };
        self.ignore
            .iter()
            .map(|p| {
                p.iter()
                    .map(|[x, y]| [x * sx - f64::from(r.x), y * sy - f64::from(r.y)])
                    .collect()
            })
            .collect()
    }
}

/// Which pixels of the `size × size` anomaly map of the crop `r` (of a `width × height` frame)
/// lie inside an ignore polygon (row-major, `true` = ignored); `None` when there are no
/// polygons. A map pixel is ignored when its centre, mapped back to the crop, is inside a
/// polygon (even–odd rule).
pub fn ignore_mask(
    shape: &RegionShape,
    r: PixelRect,
    width: u32,
    height: u32,
    size: usize,
) -> Option<Vec<bool>> {
    if shape.ignore.is_empty() || size == 0 {
        return None;
    }
    let polys = shape.polygons_in_crop(r, width, height);
    let (kx, ky) = (f64::from(r.w) / size as f64, f64::from(r.h) / size as f64);
    let mut mask = vec![false; size * size];
    for row in 0..size {
        let py = (row as f64 + 0.5) * ky;
        for col in 0..size {
            let px = (col as f64 + 0.5) * kx;
            mask[row * size + col] = polys.iter().any(|p| contains(p, px, py));
        }
    }
    Some(mask)
}

/// Sets the ignored pixels of `map` to 0 and returns the maximum and the share at or above
/// `pixel_threshold` of the pixels not ignored (0 and 0 when all are ignored). `ignore` is
/// [`ignore_mask`]'s for this map; a mask of another length ignores nothing.
pub fn mask_map(map: &mut [f32], ignore: &[bool], pixel_threshold: f32) -> (f32, f32) {
    if ignore.len() != map.len() {
        let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let over = map.iter().filter(|v| **v >= pixel_threshold).count();
        return (max, over as f32 / map.len().max(1) as f32);
    }
    let mut max = f32::NEG_INFINITY;
    let (mut over, mut kept) = (0usize, 0usize);
    for (v, ig) in map.iter_mut().zip(ignore) {
        if *ig {
            *v = 0.0;
        } else {
            kept += 1;
            max = max.max(*v);
            over += usize::from(*v >= pixel_threshold);
        }
    }
    if kept == 0 {
        max = 0.0;
    }
    (max, over as f32 / kept.max(1) as f32)
}

/// Even–odd point-in-polygon test (ray cast towards +x).
pub fn contains(poly: &[[f64; 2]], x: f64, y: f64) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n.wrapping_sub(1);
    for i in 0..n {
        let [xi, yi] = poly[i];
        let [xj, yj] = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The first pair of non-adjacent edges that intersect (edge `i` joins point `i` and `i + 1`).
pub fn self_intersection(poly: &[[f64; 2]]) -> Option<(usize, usize)> {
    let n = poly.len();
    if n < 4 {
        // A triangle can only be degenerate, not crossing.
        return None;
    }
    let edge = |i: usize| (poly[i], poly[(i + 1) % n]);
    for i in 0..n {
        for j in i + 1..n {
            // Adjacent edges share a point.
            if j == i + 1 || (i == 0 && j == n - 1) {
                continue;
            }
            let (a, b) = edge(i);
            let (c, d) = edge(j);
            if segments_intersect(a, b, c, d) {
                return Some((i, j));
            }
        }
    }
    None
}

fn orient(a: [f64; 2], b: [f64; 2], c: [f64; 2]) -> f64 {
    (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
}

fn on_segment(a: [f64; 2], b: [f64; 2], p: [f64; 2]) -> bool {
    p[0] >= a[0].min(b[0])
        && p[0] <= a[0].max(b[0])
        && p[1] >= a[1].min(b[1])
        && p[1] <= a[1].max(b[1])
}

fn segments_intersect(a: [f64; 2], b: [f64; 2], c: [f64; 2], d: [f64; 2]) -> bool {
    let (d1, d2) = (orient(c, d, a), orient(c, d, b));
    let (d3, d4) = (orient(a, b, c), orient(a, b, d));
    if ((d1 > 0.0 && d2 < 0.0) || (d1 < 0.0 && d2 > 0.0))
        && ((d3 > 0.0 && d4 < 0.0) || (d3 < 0.0 && d4 > 0.0))
    {
        return true;
    }
    (d1 == 0.0 && on_segment(c, d, a))
        || (d2 == 0.0 && on_segment(c, d, b))
        || (d3 == 0.0 && on_segment(a, b, c))
        || (d4 == 0.0 && on_segment(a, b, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frac(rect: [f64; 4], ignore: Vec<Vec<[f64; 2]>>) -> RegionShape {
        RegionShape {
            units: Units::Fraction,
            rect,
            ignore,
        }
    }

    #[test]
    fn fractions_become_pixel_edges_of_the_full_resolution_frame() {
        let s = frac([0.5, 0.25, 0.5, 0.5], vec![]);
        assert_eq!(
            s.pixel_rect(1920, 1080).unwrap(),
            PixelRect {
                x: 960,
                y: 270,
                w: 960,
                h: 540
            }
        );
        assert_eq!(
            RegionShape::full().pixel_rect(7, 5).unwrap(),
            PixelRect {
                x: 0,
                y: 0,
                w: 7,
                h: 5
            }
        );
    }

    #[test]
    fn a_pixel_rect_outside_a_smaller_frame_is_an_error_not_a_panic() {
        let s = RegionShape {
            units: Units::Pixel,
            rect: [1000.0, 0.0, 920.0, 1080.0],
            ignore: vec![],
        };
        assert!(s.pixel_rect(1920, 1080).is_ok());
        let e = s.pixel_rect(1280, 720).unwrap_err();
        assert!(e.to_string().contains("1280x720"), "{e}");
        let tiny = frac([0.0, 0.0, 0.001, 0.001], vec![]);
        assert!(matches!(
            tiny.pixel_rect(100, 100),
            Err(RegionError::Empty { .. })
        ));
    }

    #[test]
    fn validation_names_zero_area_outside_points_and_crossings() {
        let bad = frac(
            [0.5, 0.5, 0.6, 0.0],
            vec![
                vec![[0.1, 0.1], [0.2, 0.1]],
                vec![[0.6, 0.6], [0.9, 0.9], [0.9, 0.6], [0.6, 0.9]],
            ],
        );
        let msgs = bad.validate().join("\n");
        assert!(msgs.contains("zero area"), "{msgs}");
        assert!(msgs.contains("outside the frame"), "{msgs}");
        assert!(msgs.contains("at least 3 points"), "{msgs}");
        let bow = frac(
            [0.0, 0.0, 1.0, 1.0],
            vec![vec![[0.6, 0.6], [0.9, 0.9], [0.9, 0.6], [0.6, 0.9]]],
        );
        assert!(bow.validate().join("").contains("intersects itself"));
        let outside = frac(
            [0.0, 0.0, 0.5, 0.5],
            vec![vec![[0.1, 0.1], [0.7, 0.1], [0.1, 0.3]]],
        );
        assert!(outside.validate().join("").contains("outside the region"));
        let good = frac(
            [0.0, 0.0, 0.5, 0.5],
            vec![vec![[0.1, 0.1], [0.3, 0.1], [0.3, 0.3], [0.1, 0.3]]],
        );
        assert!(good.validate().is_empty(), "{:?}", good.validate());
    }

    #[test]
    fn the_ignore_mask_covers_the_map_pixels_whose_centres_are_inside() {
        // Region = right half of a 200x100 frame; polygon = its left half (frame x 100..150).
        let s = RegionShape {
            units: Units::Pixel,
            rect: [100.0, 0.0, 100.0, 100.0],
            ignore: vec![vec![
                [100.0, 0.0],
                [150.0, 0.0],
                [150.0, 100.0],
                [100.0, 100.0],
            ]],
        };
        let r = s.pixel_rect(200, 100).unwrap();
        let m = ignore_mask(&s, r, 200, 100, 4).unwrap();
        // Map columns 0 and 1 (centres at crop x 12.5, 37.5) are inside; 2 and 3 are not.
        for row in 0..4 {
            assert_eq!(&m[row * 4..row * 4 + 4], &[true, true, false, false]);
        }
        assert!(ignore_mask(&RegionShape::full(), r, 200, 100, 4).is_none());
    }

    #[test]
    fn even_odd_containment_of_a_concave_polygon() {
        // An L shape.
        let l = [
            [0.0, 0.0],
            [2.0, 0.0],
            [2.0, 1.0],
            [1.0, 1.0],
            [1.0, 2.0],
            [0.0, 2.0],
        ];
        assert!(contains(&l, 0.5, 0.5));
        assert!(contains(&l, 1.5, 0.5));
        assert!(contains(&l, 0.5, 1.5));
        assert!(!contains(&l, 1.5, 1.5));
        assert!(self_intersection(&l).is_none());
    }
}
