//! Config problems and the machinery every stage's config resolution shares: a [`Problem`]
//! (file, line, TOML path, message), the [`Ctx`] that collects them with their lines, the
//! [`FsChecks`] level, and small range checks.
//!
//! A leaf: it imports nothing from the crate, so each stage's `config.rs` can use it without an
//! import cycle (`config` → `camera::config` → `config::problems`).
//!
//! Input: spans (byte ranges into the config text) and messages. Output: problems in the
//! `file:line: path: message` form. Nothing here fails.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use crate::fsio;

/// An optional key of a raw (as written) config table, with its place in the file.
pub(crate) type S<T> = Option<Spanned<T>>;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as given by the caller (e.g. `config.toml`).
    pub file: String,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// TOML path (`camera[1].uri`), empty for syntax errors and whole-file problems.
    pub path: String,
    /// What is wrong, lowercase, naming the fix where there is one.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems of a config file; `Display` prints one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// In file order (by line; problems without a line first).
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// How far validation may look outside the text.
///
/// - [`FsChecks::Disabled`]: the text only (tests of the example file).
/// - [`FsChecks::Enabled`]: what `run` (and a SIGHUP reload) checks before it starts anything:
///   password and TLS files readable and parsed, the model package's manifest present,
///   `file://` sources present, the ONNX Runtime library present.
/// - [`FsChecks::Full`]: what `check-config` checks: everything [`FsChecks::Enabled`] does, plus
///   a write probe in the state directory (created if missing, as `run` would), the model
///   package loaded with every file hashed (seconds for a big model), and every camera source
///   built by GStreamer (elements created, none started) — a camera whose source cannot be built
///   does not stop `run` (it reports `error: …` and the others go on), but `check-config`
///   refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FsChecks {
    Disabled,
    Enabled,
    Full,
}

/// Collects the problems of one config text, with their lines.
pub(crate) struct Ctx<'a> {
    pub text: &'a str,
    pub origin: &'a str,
    pub fs: FsChecks,
    pub problems: Vec<Problem>,
    /// Byte offsets of the newlines, so that a line number is a binary search (a file with
    /// thousands of problems must not rescan the text for each one).
    newlines: Vec<usize>,
}

impl<'a> Ctx<'a> {
    pub fn new(text: &'a str, origin: &'a str, fs: FsChecks) -> Self {
        Self {
            text,
            origin,
            fs,
            problems: Vec::new(),
            newlines: text
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        }
    }

    /// The 1-based line of byte `offset` (offsets past the end count as the last line).
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        // Newlines strictly before `end`.
        self.newlines.partition_point(|&n| n < end) + 1
    }

    pub fn push(
        &mut self,
        span: Option<Range<usize>>,
        path: impl Into<String>,
        msg: impl Into<String>,
    ) {
        let line = span.map(|s| self.line_of(s.start));
        self.problems.push(Problem {
            file: self.origin.to_owned(),
            line,
            path: path.into(),
            message: msg.into(),
        });
    }

    pub fn at<T>(&mut self, v: &Spanned<T>, path: impl Into<String>, msg: impl Into<String>) {
        self.push(Some(v.span()), path, msg);
    }

    /// Whether a problem was already reported at `path` or below it (so a removed bad key is not
    /// reported a second time as missing).
    pub fn reported(&self, path: &str) -> bool {
        self.problems.iter().any(|p| {
            p.path == path
                || p.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }

    /// Whether the file system may be looked at ([`FsChecks::Enabled`] or more).
    pub fn fs(&self) -> bool {
        self.fs >= FsChecks::Enabled
    }

    /// Whether the slow and probing checks of `check-config` run ([`FsChecks::Full`]).
    pub fn full(&self) -> bool {
        self.fs == FsChecks::Full
    }
}

/// The problem message for an invalid node id / camera name (`max`: the longest accepted).
pub(crate) fn name_problem(s: &str, max: usize) -> String {
    format!(
        "invalid name {s:?}: use 1 to {max} characters of A-Z a-z 0-9 _ - \
         (it becomes an MQTT topic level)"
    )
}

/// Checks a value against an inclusive range, reporting at its span.
pub(crate) fn in_range<T: PartialOrd + fmt::Display + Copy>(
    ctx: &mut Ctx<'_>,
    v: &Spanned<T>,
    path: &str,
    lo: T,
    hi: T,
) -> bool {
    let x = *v.get_ref();
    if x < lo || x > hi {
        ctx.at(
            v,
            path,
            format!("{x} is out of range (expected {lo} to {hi})"),
        );
        false
    } else {
        true
    }
}

/// Checks a value against [0, 1], reporting at its span.
pub(crate) fn unit_interval(ctx: &mut Ctx<'_>, v: &Spanned<f64>, path: &str) -> bool {
    let x = *v.get_ref();
    if !x.is_finite() || !(0.0..=1.0).contains(&x) {
        ctx.at(v, path, format!("{x} is outside [0, 1]"));
        false
    } else {
        true
    }
}

/// The value of an optional key, or `default`.
pub(crate) fn get<T: Copy>(v: &S<T>, default: T) -> T {
    v.as_ref().map_or(default, |s| *s.get_ref())
}

/// Reads a file that must be readable; reports at `v` otherwise. `None` when unreadable or when
/// file system checks are off.
pub(crate) fn read_file(
    ctx: &mut Ctx<'_>,
    v: &Spanned<String>,
    path: &str,
    what: &str,
) -> Option<Vec<u8>> {
    if !ctx.fs() {
        return None;
    }
    let max = if path == "mqtt.password_file" {
        fsio::MAX_PASSWORD_FILE
    } else {
        fsio::MAX_PEM_FILE
    };
    match fsio::read_limited(Path::new(v.get_ref()), max, "file") {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            ctx.at(
                v,
                path,
                format!("cannot read {what} {:?}: {}", v.get_ref(), e.cause()),
            );
            None
        }
    }
}
