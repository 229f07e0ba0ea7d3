//! From a [`Source`](super::Source) to a built pipeline whose last element is `appsink name=sink`.
//!
//! [`plan`] is pure (no GStreamer): it checks the source with [`check_source`] (the check the
//! config uses too) and writes the description.
//! URIs are not written into the description: they are set as properties on the element named
//! `src` after parsing, so they need no quoting and never appear in logs unredacted.
//! [`build`] parses the description and finds the appsink. [`install_keyframe_gate`] keeps
//! frames decoded before the first keyframe, or flagged corrupt, from reaching the appsink.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::config::{Checked, UriKind, check_source};
use super::{CameraError, CameraSettings};

/// What kind of source a plan is for; decides the EOS policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rtsp,
    File,
    Http,
    V4l2,
    Pipeline,
}

/// A property set on the element named `src` after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceProperty {
    pub property: &'static str,
    pub value: String,
}

/// A pipeline ready to be built (repeatedly: once per attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub kind: Kind,
    /// The full description, or for [`Kind::Pipeline`] the user's description.
    pub description: String,
    /// For [`Kind::Pipeline`]: the tail appended when the user's description has no `sink`.
    pub wrap_tail: Option<String>,
    pub source_property: Option<SourceProperty>,
}

impl Plan {
    /// A `file://` source loops at its end instead of failing.
    pub fn loops_at_eos(&self) -> bool {
        self.kind == Kind::File
    }

    /// The description for logs, with the URI (redacted) in place.
    pub fn display(&self) -> String {
        let mut s = match &self.source_property {
            Some(p) => self.description.replacen(
                "name=src",
                &format!("name=src {}=\"{}\"", p.property, redact_uri(&p.value)),
                1,
            ),
            None => self.description.clone(),
        };
        if let Some(tail) = &self.wrap_tail {
            s = format!("{s} [! {tail}, unless it has an appsink named sink]");
        }
        s
    }
}

/// The standard tail: convert to RGB (optionally scale) into `appsink name=sink`.
///
/// Scaling uses `videoscale method=catrom` (Catmull-Rom, the bicubic kernel Pillow uses, widened
/// when downscaling): of the ten `videoscale` methods it is the closest to the reference's Pillow
/// path (max 3 levels per pixel at 518 on the golden images, 7 on a 1080p frame; the default
/// bilinear method aliases: up to 97 levels). Measured by `tests/drift.rs`; see `docs/score.md`.
fn tail(settings: &CameraSettings, sync: bool) -> String {
    let caps = match settings.scale {
        Some((w, h)) => {
            format!("videoscale method=catrom ! video/x-raw,format=RGB,width={w},height={h}")
        }
        None => "video/x-raw,format=RGB".to_owned(),
    };
    format!(
        "videoconvert ! {caps} ! appsink name=sink max-buffers=1 drop=true sync={sync} \
         enable-last-sample=false"
    )
}

/// Checks the source ([`check_source`], the one check the config uses too) and writes its
/// description. No GStreamer needed.
pub(crate) fn plan(settings: &CameraSettings) -> Result<Plan, CameraError> {
    let (kind, uri) = match check_source(&settings.source)? {
        Checked::Pipeline(description) => {
            return Ok(Plan {
                kind: Kind::Pipeline,
                description: description.to_owned(),
                wrap_tail: Some(tail(settings, true)),
                source_property: None,
            });
        }
        Checked::Uri(kind, uri) => (kind, uri),
    };
    let property = |property, value: &str| {
        Some(SourceProperty {
            property,
            value: value.to_owned(),
        })
    };
    let plan = match kind {
        UriKind::V4l2 => Plan {
            kind: Kind::V4l2,
            description: format!("v4l2src name=src ! decodebin ! {}", tail(settings, false)),
            wrap_tail: None,
            source_property: property("device", uri),
        },
        UriKind::Rtsp => Plan {
            kind: Kind::Rtsp,
            // Only the video stream is linked; an audio stream stays unlinked (harmless).
            description: format!(
                "rtspsrc name=src latency={} protocols=tcp+udp drop-on-latency=true \
                 ! application/x-rtp,media=video ! decodebin ! {}",
                settings.rtsp_latency.as_millis(),
                tail(settings, false)
            ),
            wrap_tail: None,
            source_property: property("location", uri),
        },
        UriKind::File => Plan {
            kind: Kind::File,
            description: format!("uridecodebin name=src ! {}", tail(settings, true)),
            wrap_tail: None,
            source_property: property("uri", uri),
        },
        UriKind::Http => Plan {
            kind: Kind::Http,
            description: format!(
                "souphttpsrc name=src is-live=true do-timestamp=true \
                 ! multipartdemux single-stream=true ! jpegdec ! {}",
                tail(settings, false)
            ),
            wrap_tail: None,
            source_property: property("location", uri),
        },
    };
    Ok(plan)
}

/// `uri` with any `user:password@` replaced by `***@`, for logs.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => uri.to_owned(),
    }
}

/// `text` with the `user:password@` of every URI in it replaced by `***@`.
pub(crate) fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                c.is_whitespace() || matches!(c, '/' | '?' | '#' | '"' | '\'' | ')' | ',')
            })
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A built pipeline and its appsink.
pub(crate) struct Built {
    pub pipeline: gst::Pipeline,
    pub sink: gst_app::AppSink,
}

fn parse(description: &str) -> Result<gst::Element, CameraError> {
    gst::parse::launch_full(description, None, gst::ParseFlags::FATAL_ERRORS)
        .map_err(|e| CameraError::Parse(one_line(e.message())))
}

/// A user's description with its own element named `sink` is used as is; otherwise the tail
/// is appended (a description ending in caps, `… ! video/x-raw,width=64`, only parses so).
fn parse_user_pipeline(description: &str, tail: &str) -> Result<gst::Element, CameraError> {
    let alone = parse(description);
    if let Ok(element) = &alone {
        let has_sink = element
            .downcast_ref::<gst::Bin>()
            .is_some_and(|bin| bin.by_name("sink").is_some());
        if has_sink {
            return alone;
        }
    }
    match parse(&format!("{description} ! {tail}")) {
        Ok(wrapped) => Ok(wrapped),
        // Report the user's own description's error when it has one.
        Err(wrapped_error) => Err(alone.err().unwrap_or(wrapped_error)),
    }
}

/// Parses the plan, sets the source property and finds the appsink. Every error here is a
/// configuration fault (it would fail the same way on every attempt).
pub(crate) fn build(plan: &Plan) -> Result<Built, CameraError> {
    let element = match &plan.wrap_tail {
        None => parse(&plan.description)?,
        Some(tail) => parse_user_pipeline(&plan.description, tail)?,
    };
    let pipeline = element.downcast::<gst::Pipeline>().map_err(|_| {
        CameraError::Sink("the description must link a source to a sink, not be one element".into())
    })?;
    let sink = pipeline
        .by_name("sink")
        .ok_or_else(|| CameraError::Sink("no element named 'sink'".into()))?;
    let sink = sink.downcast::<gst_app::AppSink>().map_err(|other| {
        let factory = other
            .factory()
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| other.type_().name().to_owned());
        CameraError::Sink(format!(
            "the element named 'sink' is a {factory}, it must be an appsink"
        ))
    })?;
    if plan.kind == Kind::Pipeline {
        // The user's own appsink (or ours, harmlessly): force the edge contract.
        sink.set_caps(Some(
            &gst::Caps::builder("video/x-raw")
                .field("format", "RGB")
                .build(),
        ));
        sink.set_max_buffers(1);
        sink.set_drop(true);
        sink.set_property("enable-last-sample", false);
    }
    if let Some(p) = &plan.source_property {
        let src = pipeline
            .by_name("src")
            .ok_or_else(|| CameraError::Sink("no element named 'src'".into()))?;
        let settable = src
            .find_property(p.property)
            .is_some_and(|spec| spec.value_type() == String::static_type());
        if !settable {
            return Err(CameraError::Parse(format!(
                "element 'src' has no string property '{}'",
                p.property
            )));
        }
        src.set_property(p.property, &p.value);
    }
    Ok(Built { pipeline, sink })
}

/// Gates every video decoder of `pipeline`, present or added later (`decodebin` adds its decoder
/// once the stream's caps are known): see the module documentation of [`crate::camera`],
/// "Keyframe gate". Each dropped buffer adds one to `skipped`. Call once per built pipeline:
/// the gate state lives in the probes, so every (re)connect starts closed.
pub(crate) fn install_keyframe_gate(pipeline: &gst::Pipeline, skipped: &Arc<AtomicU64>) {
    let mut existing = pipeline.iterate_recurse();
    while let Ok(Some(element)) = existing.next() {
        gate_decoder(&element, skipped);
    }
    let skipped = Arc::clone(skipped);
    pipeline.connect_deep_element_added(move |_, _, element| gate_decoder(element, &skipped));
}

/// Whether `element` is a video decoder (element class `…Decoder…Video…`, e.g.
/// `Codec/Decoder/Video`; `decodebin` itself is `Generic/Bin/Decoder`).
fn is_video_decoder(element: &gst::Element) -> bool {
    element.factory().is_some_and(|f| {
        let klass = f.metadata(gst::ELEMENT_METADATA_KLASS).unwrap_or_default();
        klass.contains("Decoder") && klass.contains("Video")
    })
}

/// Sets a boolean property if the element has one by that name.
fn set_bool_if_present(element: &gst::Element, name: &str, value: bool) {
    if element
        .find_property(name)
        .is_some_and(|p| p.value_type() == bool::static_type())
    {
        element.set_property(name, value);
    }
}

/// Whether a buffer opens the stream for the decoder: not a delta unit (a keyframe). A delta unit
/// flagged `HEADER` does not: `h264parse` flags the first access unit after a join `HEADER` when
/// it carries the parameter sets, and its slices still need a reference frame. The decoder has
/// the parameter sets from the caps (`codec_data`, from the SDP's `sprop-parameter-sets`) or the
/// keyframe itself.
fn opens_stream(buffer: &gst::BufferRef) -> bool {
    !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT)
}

fn gate_decoder(element: &gst::Element, skipped: &Arc<AtomicU64>) {
    if !is_video_decoder(element) {
        return;
    }
    set_bool_if_present(element, "output-corrupt", false);
    set_bool_if_present(element, "discard-corrupted-frames", true);
    if let Some(sink) = element.static_pad("sink") {
        let opened = AtomicBool::new(false);
        let skipped = Arc::clone(skipped);
        sink.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            move |_, info| {
                if opened.load(Ordering::Relaxed) {
                    return gst::PadProbeReturn::Ok;
                }
                let opens = match &info.data {
                    Some(gst::PadProbeData::Buffer(b)) => opens_stream(b),
                    Some(gst::PadProbeData::BufferList(l)) => l.iter().any(opens_stream),
                    _ => return gst::PadProbeReturn::Ok,
                };
                if opens {
                    opened.store(true, Ordering::Relaxed);
                    gst::PadProbeReturn::Ok
                } else {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    gst::PadProbeReturn::Drop
                }
            },
        );
    }
    if let Some(src) = element.static_pad("src") {
        let skipped = Arc::clone(skipped);
        src.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            let corrupt = matches!(
                &info.data,
                Some(gst::PadProbeData::Buffer(b)) if b.flags().contains(gst::BufferFlags::CORRUPTED)
            );
            if corrupt {
                skipped.fetch_add(1, Ordering::Relaxed);
                gst::PadProbeReturn::Drop
            } else {
                gst::PadProbeReturn::Ok
            }
        });
    }
    tracing::debug!(decoder = %element.name(), "keyframe gate installed");
}

/// Whether a bus error needs a human rather than a reconnect (a missing plugin or codec:
/// retrying cannot install it).
pub(crate) fn is_persistent(error: &gst::glib::Error) -> bool {
    error.matches(gst::CoreError::MissingPlugin) || error.matches(gst::StreamError::CodecNotFound)
}

/// The first line of `s`, trimmed.
pub(crate) fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camera::Source;

    fn settings(source: Source) -> CameraSettings {
        CameraSettings::new("cam", source)
    }

    #[test]
    fn rtsp_plan_sets_location_after_parsing() {
        let p = plan(&settings(Source::Uri("rtsp://u:p@10.0.0.5:554/s1".into()))).expect("plan");
        assert_eq!(p.kind, Kind::Rtsp);
        assert!(p.description.starts_with("rtspsrc name=src latency=200 "));
        assert!(p.description.ends_with(
            "appsink name=sink max-buffers=1 drop=true sync=false enable-last-sample=false"
        ));
        assert!(!p.description.contains("10.0.0.5"));
        assert_eq!(
            p.source_property
                .as_ref()
                .map(|s| (s.property, s.value.as_str())),
            Some(("location", "rtsp://u:p@10.0.0.5:554/s1"))
        );
        let shown = p.display();
        assert!(
            shown.contains("location=\"rtsp://***@10.0.0.5:554/s1\""),
            "{shown}"
        );
        assert!(!shown.contains("u:p"));
    }

    #[test]
    fn each_uri_kind_gets_its_source() {
        let kind = |uri: &str| plan(&settings(Source::Uri(uri.into()))).map(|p| p.kind);
        assert_eq!(kind("RTSP://h/x").ok(), Some(Kind::Rtsp));
        assert_eq!(kind("rtsps://h/x").ok(), Some(Kind::Rtsp));
        assert_eq!(kind("file:///tmp/a.mp4").ok(), Some(Kind::File));
        assert_eq!(kind("http://h/mjpg").ok(), Some(Kind::Http));
        assert_eq!(kind("https://h/mjpg").ok(), Some(Kind::Http));
        assert_eq!(kind("/dev/video0").ok(), Some(Kind::V4l2));
        for bad in ["foo://x", "x", "", "/tmp/a.mp4", "://x"] {
            let err = kind(bad).expect_err(bad);
            assert!(err.to_string().contains("unsupported camera uri"), "{err}");
        }
    }

    #[test]
    fn file_plays_in_real_time_and_loops() {
        let p = plan(&settings(Source::Uri("file:///a.mp4".into()))).expect("plan");
        assert!(p.description.contains("sync=true"));
        assert!(p.loops_at_eos());
    }

    #[test]
    fn scale_adds_videoscale_and_size_caps() {
        let mut s = settings(Source::Uri("http://h/m".into()));
        s.scale = Some((640, 360));
        let p = plan(&s).expect("plan");
        assert!(
            p.description.contains(
                "videoscale method=catrom ! video/x-raw,format=RGB,width=640,height=360 ! appsink"
            ),
            "{}",
            p.description
        );
    }

    #[test]
    fn pipeline_source_keeps_description_and_wraps_lazily() {
        let p = plan(&settings(Source::Pipeline(" videotestsrc ".into()))).expect("plan");
        assert_eq!(p.description, "videotestsrc");
        assert!(
            p.wrap_tail
                .as_deref()
                .is_some_and(|t| t.contains("sync=true"))
        );
        assert!(plan(&settings(Source::Pipeline("  ".into()))).is_err());
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_uri("rtsp://a:b@h:1/p@q"), "rtsp://***@h:1/p@q");
        assert_eq!(redact_uri("rtsp://h/p"), "rtsp://h/p");
        assert_eq!(redact_uri("/dev/video0"), "/dev/video0");
        assert_eq!(redact_uri("http://a@b@h?x=@"), "http://***@h?x=@");
        assert_eq!(
            redact_text("Not Found (404), URL: http://u:p@h/x, Redirect to: rtsp://h:1/y."),
            "Not Found (404), URL: http://***@h/x, Redirect to: rtsp://h:1/y."
        );
        assert_eq!(redact_text("no uri"), "no uri");
    }
}
