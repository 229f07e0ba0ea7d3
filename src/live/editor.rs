//! The region editor's file side: one camera's `[[camera.region]]` tables in the config file,
//! read for the page and replaced by an edit made on the page — with `toml_edit`, so every
//! comment, key order and other table of the file stays as the user wrote it.
//!
//! Input: the config file's text, a camera name and an [`Edit`] (the regions the page holds:
//! a kept region by its original name, a moved or new one with a rectangle and ignore polygons
//! in fractions of the frame). Output: the regions as the file has them ([`regions_of`]), the
//! new file text ([`apply`]), the file written by [`write_atomic`] (a new file beside the
//! target, fsync, rename over it, fsync of the directory: a crash leaves the old file or the
//! new one, never a mix).
//!
//! Failure modes, one [`EditError`] line each naming the camera, region or value: the file is
//! not TOML, the camera is not a `[[camera]]` table of it, an edit names an original region the
//! file does not have (or twice), a new region without a rectangle, non-finite geometry.
//! Whether the new text is a valid configuration is not decided here: the server runs the
//! checks of `check-config` on it before anything is written.
//!
//! Geometry written by the editor is in fractions (`rect`), rounded to 4 decimals (0.13 px of a
//! 1280 px frame) and kept inside the frame and the rectangle after rounding; a region the page
//! did not move keeps its keys untouched (a `rect_px` stays in pixels). The region's other keys
//! (`statistic`, `threshold`, `t1`, `calibration`, `reference`, comments) follow it through a
//! move or a rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, Value};

/// A region as the config file has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileRegion {
    pub name: String,
    /// `rect`: x, y, width, height in fractions of the frame.
    pub rect: Option<[f64; 4]>,
    /// `rect_px`: the same in pixels of the full-resolution frame.
    pub rect_px: Option<[f64; 4]>,
    /// `ignore` polygons, in the units of the rectangle.
    pub ignore: Vec<Vec<[f64; 2]>>,
    /// The region's other keys as written (`statistic = "map_max"`), for display.
    pub keys: Vec<String>,
}

/// What the page sends: every region the camera is to have, in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// The file's digest when the page read it ([`digest_hex`]); a file changed since then is
    /// not overwritten.
    pub base: String,
    pub regions: Vec<RegionEdit>,
}

/// One region of an [`Edit`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionEdit {
    pub name: String,
    /// The region's name in the file, when it is one the file has (its keys are kept).
    #[serde(default)]
    pub from: Option<String>,
    /// A new rectangle in fractions; absent: `from`'s geometry stays as it is.
    #[serde(default)]
    pub rect: Option<[f64; 4]>,
    /// The ignore polygons in fractions of the frame; only with `rect`.
    #[serde(default)]
    pub ignore: Option<Vec<Vec<[f64; 2]>>>,
}

/// Why an edit cannot be applied to the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EditError {
    #[error("the config file is not valid TOML: {0}")]
    NotToml(String),
    #[error("camera {0:?} is not a [[camera]] table of the config file")]
    NoCamera(String),
    #[error(
        "camera {camera:?}: regions written as {found} cannot be edited here (use [[camera.region]] tables)"
    )]
    Layout { camera: String, found: &'static str },
    #[error("region {0:?}: the config file has no region of that name (reload the page)")]
    NoRegion(String),
    #[error("region {0:?} is used twice as an original")]
    Twice(String),
    #[error("region {0:?}: a new region needs a rectangle")]
    NoRect(String),
    #[error("region {0:?}: ignore polygons are sent with their rectangle")]
    IgnoreWithoutRect(String),
    #[error("region {0:?}: {1} is not a finite number")]
    NotFinite(String, &'static str),
}

/// Decimals kept for fractions written by the editor.
const SCALE: f64 = 10_000.0;

/// SHA-256 of the file's bytes, hex.
pub fn digest_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Float(f) => Some(*f.value()),
        Value::Integer(i) => Some(*i.value() as f64),
        _ => None,
    }
}

fn quad(item: Option<&Item>) -> Option<[f64; 4]> {
    let a = item?.as_array()?;
    let v: Vec<f64> = a.iter().filter_map(number).collect();
    (v.len() == 4 && a.len() == 4).then(|| [v[0], v[1], v[2], v[3]])
}

fn polygons(item: Option<&Item>) -> Vec<Vec<[f64; 2]>> {
    let Some(a) = item.and_then(Item::as_array) else {
        return Vec::new();
    };
    a.iter()
        .filter_map(Value::as_array)
        .map(|poly| {
            poly.iter()
                .filter_map(Value::as_array)
                .filter_map(|p| {
                    let v: Vec<f64> = p.iter().filter_map(number).collect();
                    (v.len() == 2).then(|| [v[0], v[1]])
                })
                .collect()
        })
        .collect()
}

fn parse(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>()
        .map_err(|e| EditError::NotToml(e.to_string().lines().next().unwrap_or("").to_owned()))
}

fn camera_table<'d>(doc: &'d mut DocumentMut, camera: &str) -> Result<&'d mut Table, EditError> {
    doc.get_mut("camera")
        .and_then(Item::as_array_of_tables_mut)
        .and_then(|cams| {
            cams.iter_mut()
                .find(|t| t.get("name").and_then(Item::as_str) == Some(camera))
        })
        .ok_or_else(|| EditError::NoCamera(camera.to_owned()))
}

/// The camera's region tables, cloned (inline tables converted).
fn region_tables(cam: &Table, camera: &str) -> Result<Vec<Table>, EditError> {
    match cam.get("region") {
        None => Ok(Vec::new()),
        Some(Item::ArrayOfTables(a)) => Ok(a.iter().cloned().collect()),
        Some(Item::Value(Value::Array(a))) => a
            .iter()
            .map(|v| match v {
                Value::InlineTable(t) => Ok(t.clone().into_table()),
                _ => Err(EditError::Layout {
                    camera: camera.to_owned(),
                    found: "an array of non-tables",
                }),
            })
            .collect(),
        Some(_) => Err(EditError::Layout {
            camera: camera.to_owned(),
            found: "something other than tables",
        }),
    }
}

/// The camera's regions as the file has them.
pub fn regions_of(text: &str, camera: &str) -> Result<Vec<FileRegion>, EditError> {
    let mut doc = parse(text)?;
    let cam = camera_table(&mut doc, camera)?;
    Ok(region_tables(cam, camera)?
        .iter()
        .map(|t| FileRegion {
            name: t
                .get("name")
                .and_then(Item::as_str)
                .unwrap_or("")
                .to_owned(),
            rect: quad(t.get("rect")),
            rect_px: quad(t.get("rect_px")),
            ignore: polygons(t.get("ignore")),
            keys: t
                .iter()
                .filter(|(k, _)| !matches!(*k, "name" | "rect" | "rect_px" | "ignore"))
                .map(|(k, v)| match v.as_value() {
                    Some(v) => {
                        let mut v = v.clone();
                        v.decor_mut().clear();
                        format!("{k} = {v}")
                    }
                    None => format!("[{k}]"),
                })
                .collect(),
        })
        .collect())
}

fn round(v: f64) -> f64 {
    (v * SCALE).round() / SCALE
}

/// Rounds a rectangle to 4 decimals and keeps it inside [0, 1] when the page meant it to be
/// (a right or bottom edge within one rounding step past 1 is pulled back).
fn round_rect(r: [f64; 4]) -> [f64; 4] {
    let (x, y) = (round(r[0]), round(r[1]));
    let mut w = round(r[2]);
    let mut h = round(r[3]);
    if x + w > 1.0 && x + w <= 1.0 + 1.0 / SCALE {
        w = ((1.0 - x) * SCALE).floor() / SCALE;
    }
    if y + h > 1.0 && y + h <= 1.0 + 1.0 / SCALE {
        h = ((1.0 - y) * SCALE).floor() / SCALE;
    }
    [x, y, w, h]
}

fn float_array(v: &[f64]) -> Array {
    v.iter().copied().collect()
}

/// The new file text: the camera's regions replaced by `edit.regions`, everything else as it
/// was. `edit.base` is not checked here (the caller compares it with the file it read).
pub fn apply(text: &str, camera: &str, edit: &Edit) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let cam = camera_table(&mut doc, camera)?;
    let old = region_tables(cam, camera)?;
    let mut used: Vec<&str> = Vec::new();
    let mut out = ArrayOfTables::new();
    for r in &edit.regions {
        let mut t = match &r.from {
            Some(from) => {
                if used.contains(&from.as_str()) {
                    return Err(EditError::Twice(from.clone()));
                }
                used.push(from);
                old.iter()
                    .find(|t| t.get("name").and_then(Item::as_str) == Some(from))
                    .cloned()
                    .ok_or_else(|| EditError::NoRegion(from.clone()))?
            }
            None => Table::new(),
        };
        if t.get("name").and_then(Item::as_str) != Some(r.name.as_str()) {
            t.insert("name", toml_edit::value(r.name.as_str()));
        }
        match (&r.rect, &r.ignore) {
            (Some(rect), ignore) => {
                if rect.iter().any(|v| !v.is_finite()) {
                    return Err(EditError::NotFinite(r.name.clone(), "rect"));
                }
                let rect = round_rect(*rect);
                t.remove("rect_px");
                t.insert("rect", toml_edit::value(float_array(&rect)));
                let polys: Vec<Vec<[f64; 2]>> = ignore.clone().unwrap_or_default();
                if polys.iter().flatten().flatten().any(|v| !v.is_finite()) {
                    return Err(EditError::NotFinite(r.name.clone(), "ignore"));
                }
                if polys.is_empty() {
                    t.remove("ignore");
                } else {
                    // Points rounded, then kept inside the rounded rectangle.
                    let clamp = |v: f64, lo: f64, len: f64| round(v).clamp(lo, round(lo + len));
                    let arr: Array = polys
                        .iter()
                        .map(|poly| {
                            Value::Array(
                                poly.iter()
                                    .map(|p| {
                                        Value::Array(float_array(&[
                                            clamp(p[0], rect[0], rect[2]),
                                            clamp(p[1], rect[1], rect[3]),
                                        ]))
                                    })
                                    .collect(),
                            )
                        })
                        .collect();
                    t.insert("ignore", toml_edit::value(arr));
                }
            }
            (None, Some(_)) => return Err(EditError::IgnoreWithoutRect(r.name.clone())),
            (None, None) if r.from.is_none() => return Err(EditError::NoRect(r.name.clone())),
            (None, None) => {}
        }
        out.push(t);
    }
    if out.is_empty() {
        cam.remove("region");
    } else {
        cam.insert("region", Item::ArrayOfTables(out));
    }
    Ok(doc.to_string())
}

/// Writes `text` to `path` atomically: a new file beside the target (the target of a symlink),
/// with the target's permissions, synced, renamed over it, then the directory synced.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let target = std::fs::canonicalize(path)?;
    let dir = target
        .parent()
        .ok_or_else(|| std::io::Error::other("the config file has no directory"))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = std::fs::metadata(&target)?.permissions().mode() & 0o7777;
    let tmp = dir.join(format!(".{name}.edit-{}", std::process::id()));
    // create_new never follows a planted symlink; a stale file of ours is removed first.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# top comment
state_dir = "/tmp/x"

[[camera]]
name = "a"   # camera a
uri = "file:///x.png"

# the left part
[[camera.region]]
name = "left"
rect_px = [0, 72, 640, 576]
statistic = "map_max"  # keep me
threshold = 0.6

[[camera.region]]
name = "right"
rect = [0.5, 0.0, 0.5, 1.0]
ignore = [[[0.6, 0.1], [0.7, 0.1], [0.7, 0.2]]]

[[camera]]
name = "b"
uri = "file:///y.png"
region = [{ name = "r", rect = [0, 0, 1, 1] }]

[mqtt]
host = "127.0.0.1"
"#;

    fn edit(regions: Vec<RegionEdit>) -> Edit {
        Edit {
            base: String::new(),
            regions,
        }
    }

    fn keep(name: &str) -> RegionEdit {
        RegionEdit {
            name: name.into(),
            from: Some(name.into()),
            rect: None,
            ignore: None,
        }
    }

    #[test]
    fn reads_regions_with_their_keys() {
        let r = regions_of(FILE, "a").expect("regions");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "left");
        assert_eq!(r[0].rect_px, Some([0.0, 72.0, 640.0, 576.0]));
        assert_eq!(r[0].rect, None);
        assert_eq!(
            r[0].keys,
            vec!["statistic = \"map_max\"", "threshold = 0.6"]
        );
        assert_eq!(r[1].ignore, vec![vec![[0.6, 0.1], [0.7, 0.1], [0.7, 0.2]]]);
        let b = regions_of(FILE, "b").expect("inline regions");
        assert_eq!(b[0].rect, Some([0.0, 0.0, 1.0, 1.0]));
        assert_eq!(regions_of(FILE, "c"), Err(EditError::NoCamera("c".into())));
    }

    #[test]
    fn keeping_everything_changes_nothing() {
        let out = apply(FILE, "a", &edit(vec![keep("left"), keep("right")])).expect("apply");
        assert_eq!(out, FILE);
    }

    #[test]
    fn a_moved_region_keeps_its_keys_and_comments_and_the_rest_of_the_file() {
        let moved = RegionEdit {
            name: "left".into(),
            from: Some("left".into()),
            rect: Some([0.1, 0.2, 0.300_004, 0.4]),
            ignore: Some(vec![vec![[0.15, 0.25], [0.2, 0.25], [0.2, 0.9]]]),
        };
        let new = RegionEdit {
            name: "new".into(),
            from: None,
            rect: Some([0.5, 0.5, 0.500_4, 0.25]),
            ignore: None,
        };
        let out = apply(FILE, "a", &edit(vec![moved, new])).expect("apply");
        assert!(out.starts_with("# top comment\n"), "{out}");
        assert!(out.contains("name = \"a\"   # camera a"), "{out}");
        assert!(out.contains("statistic = \"map_max\"  # keep me"), "{out}");
        assert!(!out.contains("rect_px"), "{out}");
        assert!(!out.contains("right"), "removed region still there: {out}");
        let r = regions_of(&out, "a").expect("regions");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].rect, Some([0.1, 0.2, 0.3, 0.4]));
        // Clamped into the rectangle (y 0.9 > 0.2 + 0.4).
        assert_eq!(
            r[0].ignore,
            vec![vec![[0.15, 0.25], [0.2, 0.25], [0.2, 0.6]]]
        );
        // 0.5 + 0.5004 > 1 by more than a rounding step: left for the checker to refuse.
        assert_eq!(r[1].rect, Some([0.5, 0.5, 0.5004, 0.25]));
        assert!(r[1].keys.is_empty());
        // The other camera and [mqtt] are untouched.
        assert!(
            out.contains("region = [{ name = \"r\", rect = [0, 0, 1, 1] }]"),
            "{out}"
        );
        assert!(out.trim_end().ends_with("host = \"127.0.0.1\""), "{out}");
        // The region tables stay under their camera.
        let b_at = out.find("name = \"b\"").expect("b");
        assert!(out.find("name = \"new\"").expect("new") < b_at, "{out}");
    }

    #[test]
    fn an_edge_one_rounding_step_past_the_frame_is_pulled_back() {
        assert_eq!(
            round_rect([0.5, 0.25, 0.500_04, 0.75]),
            [0.5, 0.25, 0.5, 0.75]
        );
        assert_eq!(
            round_rect([0.12345, 0.0, 0.87655, 1.0]),
            [0.1235, 0.0, 0.8765, 1.0]
        );
    }

    #[test]
    fn inline_regions_become_tables_and_removing_all_removes_the_key() {
        let out = apply(FILE, "b", &edit(vec![])).expect("apply");
        assert!(!out.contains("region = ["), "{out}");
        let out = apply(
            FILE,
            "b",
            &edit(vec![RegionEdit {
                name: "r2".into(),
                from: Some("r".into()),
                rect: None,
                ignore: None,
            }]),
        )
        .expect("apply");
        let r = regions_of(&out, "b").expect("regions");
        assert_eq!(r[0].name, "r2");
        assert_eq!(r[0].rect, Some([0.0, 0.0, 1.0, 1.0]));
    }

    #[test]
    fn bad_edits_are_named() {
        let e = |regions| apply(FILE, "a", &edit(regions)).expect_err("refused");
        assert_eq!(e(vec![keep("nope")]), EditError::NoRegion("nope".into()));
        assert_eq!(
            e(vec![keep("left"), keep("left")]),
            EditError::Twice("left".into())
        );
        let mut n = keep("x");
        n.from = None;
        assert_eq!(e(vec![n.clone()]), EditError::NoRect("x".into()));
        n.ignore = Some(vec![]);
        assert_eq!(e(vec![n]), EditError::IgnoreWithoutRect("x".into()));
        let mut bad = keep("left");
        bad.rect = Some([f64::NAN, 0.0, 1.0, 1.0]);
        assert_eq!(e(vec![bad]), EditError::NotFinite("left".into(), "rect"));
        assert!(matches!(
            apply("[[camera]\n", "a", &edit(vec![])),
            Err(EditError::NotToml(_))
        ));
    }

    #[test]
    fn writes_atomically_through_a_symlink_keeping_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "old").expect("write");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let link = dir.path().join("config.toml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let written = write_atomic(&link, "new").expect("write_atomic");
        assert_eq!(written, std::fs::canonicalize(&real).expect("canon"));
        assert_eq!(std::fs::read_to_string(&link).expect("read"), "new");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        let mode = std::fs::metadata(&real).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 2, "no temporary file left behind");
    }
}
