//! The official AnomalyCLIP dataset layouts that are not MVTec-style class trees: VisA (split
//! CSV), DAGM, ISIC 2016 (isbi), the species-per-folder medical sets (br35, brainmri, covid,
//! endotect) and the image/mask folder pairs (clinicdb, colondb, kvasir, tn3k).
//!
//! Input: a dataset ROOT and a [`Layout`]. Output: the [`Meta`] that the official
//! `generate_dataset_json/<name>.py` script writes for the same tree, with these deliberate
//! differences (documented in `docs/datasets.md`, each one normalised in the layout tests):
//! - paths are relative to ROOT (several official scripts prefix them with ROOT);
//! - masks are paired with images by name, not by position in two sorted lists;
//! - only image files are listed (by extension, any case) and never `meta.json` itself;
//! - items are sorted by path (the official order follows `os.listdir` and set iteration;
//!   VisA keeps the CSV order, as the official script does);
//! - DAGM's splits are written as `train`/`test` (the official `Train`/`Test` keys are not read
//!   by the official loader);
//! - COVID's normal species is `NORMAL` in any case (newer releases name it `Normal`).
//!
//! Failure modes: [`DatasetError::NoLayout`] (a folder the layout needs is missing, naming the
//! tree it expected), [`DatasetError::BadCsv`] (VisA split file unreadable or malformed, naming
//! the file and row), [`DatasetError::Io`] (a folder cannot be listed). Item-level problems (a mask
//! without an image) are [`Issue`]s.

use std::collections::BTreeMap;
use std::path::Path;

use super::dataset::{
    DatasetError, Issue, IssueKind, Layout, Meta, MetaItem, file_name, is_image_file, rel,
    sorted_entries, stem,
};

/// The VisA split file, relative to ROOT (the official `split_csv/1cls.csv`).
pub const VISA_CSV: &str = "split_csv/1cls.csv";

/// Stem suffixes that name a mask after its image (`x_mask.png`, `x_label.PNG`,
/// `ISIC_0000003_Segmentation.png`).
const MASK_SUFFIXES: &[&str] = &["_mask", "_label", "_Segmentation", "_segmentation"];

/// The image stem a mask belongs to.
fn mask_key(mask_stem: &str) -> &str {
    MASK_SUFFIXES
        .iter()
        .find_map(|s| mask_stem.strip_suffix(s))
        .unwrap_or(mask_stem)
}

/// Builds `meta` for a non-MVTec-style `layout` under `root`.
pub(super) fn discover(
    root: &Path,
    layout: Layout,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
    no_layout: impl Fn() -> DatasetError,
) -> Result<(), DatasetError> {
    let need = |rel_dir: &str| -> Result<(), DatasetError> {
        if root.join(rel_dir).is_dir() {
            Ok(())
        } else {
            Err(no_layout())
        }
    };
    match layout {
        Layout::Visa => {
            if !root.join(VISA_CSV).exists() {
                return Err(no_layout());
            }
            visa(root, meta)
        }
        Layout::Dagm => dagm(root, meta, issues, no_layout),
        Layout::Isbi => {
            need("skin/test")?;
            need("skin/ISBI2016_ISIC_Part1_Test_GroundTruth")?;
            let masks = MaskDir::new(root, "skin/ISBI2016_ISIC_Part1_Test_GroundTruth")?;
            species_tree(
                root,
                "skin/test",
                "skin",
                &|s| s == "good",
                Some(masks),
                meta,
                issues,
            )
        }
        Layout::Br35 => species_tree(root, "", "brain", &|s| s == "no", None, meta, issues),
        Layout::Brainmri => {
            need("brain_tumor_dataset")?;
            species_tree(
                root,
                "brain_tumor_dataset",
                "brain",
                &|s| s == "no",
                None,
                meta,
                issues,
            )
        }
        Layout::Covid => species_tree(
            root,
            "",
            "chest",
            &|s| s.eq_ignore_ascii_case("normal"),
            None,
            meta,
            issues,
        ),
        Layout::Endotect => {
            need("masks")?;
            let masks = MaskDir::new(root, "masks")?;
            species_tree(
                root,
                "",
                "colon",
                &|s| s == "good",
                Some(masks),
                meta,
                issues,
            )
        }
        Layout::Clinicdb | Layout::Colondb | Layout::Kvasir => {
            need("images")?;
            need("masks")?;
            image_mask_pair(root, "images", "masks", "colon", meta, issues)
        }
        Layout::Tn3k => {
            need("test-image")?;
            need("test-mask")?;
            image_mask_pair(root, "test-image", "test-mask", "thyroid", meta, issues)
        }
        // MVTec-style layouts and `auto` are handled by the caller.
        _ => Err(no_layout()),
    }
}

/// A folder of masks, indexed by the stem of the image each belongs to.
struct MaskDir {
    /// Path relative to ROOT.
    rel: String,
    /// Image stem → mask file name.
    by_key: BTreeMap<String, String>,
    /// Mask file names paired so far.
    used: Vec<String>,
}

impl MaskDir {
    fn new(root: &Path, rel_dir: &str) -> Result<Self, DatasetError> {
        let mut by_key = BTreeMap::new();
        for p in sorted_entries(&root.join(rel_dir))? {
            if is_image_file(&p) {
                let s = stem(&p);
                by_key
                    .entry(mask_key(&s).to_owned())
                    .or_insert_with(|| file_name(&p));
            }
        }
        Ok(Self {
            rel: rel_dir.to_owned(),
            by_key,
            used: Vec::new(),
        })
    }

    /// The mask path (relative to ROOT) for an image, or "" when it has none.
    fn pair(&mut self, image_stem: &str) -> String {
        match self.by_key.get(image_stem) {
            Some(m) => {
                self.used.push(m.clone());
                rel(&self.rel, &[m])
            }
            None => String::new(),
        }
    }

    /// Issues for masks that no image took.
    fn unpaired(&self, class: &str, issues: &mut Vec<Issue>) {
        for m in self.by_key.values() {
            if !self.used.contains(m) {
                issues.push(Issue::new(
                    IssueKind::UnpairedMask,
                    class,
                    Some(&rel(&self.rel, &[m])),
                    "mask without an image of the same name: ignored",
                ));
            }
        }
    }
}

/// Image files in `dir`, sorted by name.
fn images_in(dir: &Path) -> Result<Vec<String>, DatasetError> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| is_image_file(p))
        .map(|p| file_name(&p))
        .collect())
}

/// Test split of one class whose species are the sub-folders of `ROOT/<base>` (image files
/// directly inside each); anomalous species take masks from `masks` when given.
fn species_tree(
    root: &Path,
    base: &str,
    class: &str,
    is_normal: &dyn Fn(&str) -> bool,
    mut masks: Option<MaskDir>,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
) -> Result<(), DatasetError> {
    let base_dir = if base.is_empty() {
        root.to_owned()
    } else {
        root.join(base)
    };
    let mask_folder = masks.as_ref().map(|m| m.rel.clone());
    let mut items = Vec::new();
    for dir in sorted_entries(&base_dir)? {
        let species = file_name(&dir);
        if !dir.is_dir() || species.starts_with('.') || Some(&species) == mask_folder.as_ref() {
            continue;
        }
        let normal = is_normal(&species);
        for img in images_in(&dir)? {
            let mask_path = match (&mut masks, normal) {
                (Some(m), false) => m.pair(&stem(Path::new(&img))),
                _ => String::new(),
            };
            items.push(MetaItem {
                img_path: rel(base, &[&species, &img]),
                mask_path,
                cls_name: class.to_owned(),
                specie_name: species.clone(),
                anomaly: u8::from(!normal),
            });
        }
    }
    if let Some(m) = &masks {
        m.unpaired(class, issues);
    }
    meta.test.insert(class.to_owned(), items);
    Ok(())
}

/// Test split of one class of anomalous images in `ROOT/<images>` with masks of the same name in
/// `ROOT/<masks>`.
fn image_mask_pair(
    root: &Path,
    images: &str,
    masks: &str,
    class: &str,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
) -> Result<(), DatasetError> {
    let mut mask_dir = MaskDir::new(root, masks)?;
    let mut items = Vec::new();
    for img in images_in(&root.join(images))? {
        items.push(MetaItem {
            mask_path: mask_dir.pair(&stem(Path::new(&img))),
            img_path: rel(images, &[&img]),
            cls_name: class.to_owned(),
            specie_name: String::new(),
            anomaly: 1,
        });
    }
    mask_dir.unpaired(class, issues);
    meta.test.insert(class.to_owned(), items);
    Ok(())
}

/// DAGM: every sub-folder of ROOT with `Train/` or `Test/` is a class; an image is anomalous
/// when `Label/` beside it holds its mask (`<stem>_label.<ext>`).
fn dagm(
    root: &Path,
    meta: &mut Meta,
    issues: &mut Vec<Issue>,
    no_layout: impl Fn() -> DatasetError,
) -> Result<(), DatasetError> {
    let mut found = false;
    for dir in sorted_entries(root)? {
        let class = file_name(&dir);
        if !dir.is_dir() || class.starts_with('.') {
            continue;
        }
        for (phase, split) in [("Train", &mut meta.train), ("Test", &mut meta.test)] {
            let phase_dir = dir.join(phase);
            if !phase_dir.is_dir() {
                continue;
            }
            found = true;
            let label_rel = rel(&class, &[phase, "Label"]);
            let mut masks = if root.join(&label_rel).is_dir() {
                Some(MaskDir::new(root, &label_rel)?)
            } else {
                None
            };
            let mut items = Vec::new();
            for img in images_in(&phase_dir)? {
                let mask_path = masks
                    .as_mut()
                    .map(|m| m.pair(&stem(Path::new(&img))))
                    .unwrap_or_default();
                items.push(MetaItem {
                    img_path: rel(&class, &[phase, &img]),
                    anomaly: u8::from(!mask_path.is_empty()),
                    mask_path,
                    cls_name: class.clone(),
                    specie_name: String::new(),
                });
            }
            if let Some(m) = &masks {
                m.unpaired(&class, issues);
            }
            split.insert(class.clone(), items);
        }
    }
    if found { Ok(()) } else { Err(no_layout()) }
}

/// VisA: rows of `split_csv/1cls.csv` (header, then object, split, label, image, mask — by
/// position, like the official script); rows of other splits are ignored.
fn visa(root: &Path, meta: &mut Meta) -> Result<(), DatasetError> {
    let path = root.join(VISA_CSV);
    let text =
        crate::fsio::read_limited_string(&path, crate::fsio::MAX_META_JSON, "VisA split CSV")?;
    let bad = |message: String| DatasetError::BadCsv {
        path: path.clone(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    if header.len() < 5 {
        return Err(bad(format!(
            "header has {} columns {header:?}, expected 5: object,split,label,image,mask",
            header.len()
        )));
    }
    let mut rows = 0usize;
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let line = i + 2;
        let field = |k: usize| record.get(k).unwrap_or("").trim();
        let (object, split, label, image, mask) =
            (field(0), field(1), field(2), field(3), field(4));
        if record.len() < 4 || object.is_empty() || image.is_empty() {
            return Err(bad(format!(
                "line {line}: expected object,split,label,image[,mask], got {:?}",
                record.iter().collect::<Vec<_>>()
            )));
        }
        let anomalous = match label {
            "anomaly" => true,
            "normal" => false,
            other => {
                return Err(bad(format!(
                    "line {line}: label {other:?}, expected \"normal\" or \"anomaly\""
                )));
            }
        };
        let target = match split {
            "train" => &mut meta.train,
            "test" => &mut meta.test,
            _ => continue,
        };
        rows += 1;
        target.entry(object.to_owned()).or_default().push(MetaItem {
            img_path: image.to_owned(),
            mask_path: if anomalous {
                mask.to_owned()
            } else {
                String::new()
            },
            cls_name: object.to_owned(),
            specie_name: String::new(),
            anomaly: u8::from(anomalous),
        });
    }
    if rows == 0 {
        return Err(bad("no train or test rows".into()));
    }
    // The official script writes every class in both splits (possibly empty).
    let classes: Vec<String> = meta.train.keys().chain(meta.test.keys()).cloned().collect();
    for c in classes {
        meta.train.entry(c.clone()).or_default();
        meta.test.entry(c).or_default();
    }
    Ok(())
}
