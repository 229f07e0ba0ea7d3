//! Camera stage against real GStreamer pipelines and a simulated RTSP IP camera on 127.0.0.1.
//! Every wait is bounded; the whole file runs in well under a minute.

use crate::common;

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anomalyclip_edge::camera::{
    Camera, CameraSettings, CameraState, Frame, FrameNotify, LatestSlot, Source,
};
use common::rtsp::RtspCamera;
use common::{StatusLog, wait_until};

const ONLINE_TIMEOUT: Duration = Duration::from_secs(15);

/// Test timings: a fast watchdog and backoff so outages play out in seconds.
fn fast(name: &str, source: Source) -> CameraSettings {
    let mut s = CameraSettings::new(name, source);
    s.no_frame_timeout = Duration::from_millis(1500);
    s.backoff_initial = Duration::from_millis(100);
    s.backoff_max = Duration::from_millis(400);
    s.stable_after = Duration::from_millis(500);
    s
}

fn test_pattern(extra: &str) -> Source {
    Source::Pipeline(format!(
        "videotestsrc is-live=true {extra} ! video/x-raw,width=64,height=48,framerate=30/1"
    ))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn spawn(
    index: usize,
    settings: CameraSettings,
    notify: &Arc<FrameNotify>,
    log: &StatusLog,
) -> Camera {
    common::init_tracing();
    Camera::spawn(index, settings, Arc::clone(notify), log.callback()).expect("spawn camera")
}

/// Stops `cam` and asserts it took less than a second.
fn stop_promptly(cam: Camera) -> Duration {
    let name = cam.name().to_owned();
    let started = Instant::now();
    cam.stop().expect("camera stops");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "stopping {name} took {took:?}"
    );
    took
}

/// Takes frames from `slots` until `n` arrived or `timeout` passed.
fn take_frames(
    notify: &FrameNotify,
    slots: &[Arc<LatestSlot>],
    n: usize,
    timeout: Duration,
) -> Vec<Frame> {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    while frames.len() < n {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        frames.extend(notify.take_any(slots, deadline - now));
    }
    frames
}

#[test]
fn rtsp_camera_delivers_padded_rgb_frames_with_increasing_seq_and_timestamps() {
    let server = RtspCamera::start();
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let t0 = unix_ms();
    let cam = spawn(0, fast("rtsp", Source::Uri(server.url())), &notify, &log);
    assert!(
        log.wait_for(0, ONLINE_TIMEOUT, |s| *s == CameraState::Online),
        "never online: {:?} / {:?}",
        log.of(0),
        cam.stats()
    );
    let frames = take_frames(
        &notify,
        &[Arc::clone(cam.slot())],
        8,
        Duration::from_secs(10),
    );
    let t1 = unix_ms();
    assert!(frames.len() >= 8, "only {} frames", frames.len());
    for f in &frames {
        assert_eq!((f.camera, &*f.camera_name), (0, "rtsp"));
        assert_eq!((f.width, f.height), (320, 240));
        assert!(f.stride >= 320 * 3, "stride {}", f.stride);
        assert_eq!(f.data.len(), f.stride * 240);
        assert!(
            (t0..=t1).contains(&f.capture_unix_ms),
            "capture time {} outside [{t0}, {t1}]",
            f.capture_unix_ms
        );
        assert!(f.data.iter().any(|&b| b != 0), "an all-black frame");
    }
    for pair in frames.windows(2) {
        assert!(
            pair[1].seq > pair[0].seq,
            "seq {} then {}",
            pair[0].seq,
            pair[1].seq
        );
        assert!(pair[1].capture_unix_ms >= pair[0].capture_unix_ms);
        assert!(pair[1].captured_at > pair[0].captured_at);
    }
    // 15 fps: eight frames taken one by one span at least ~7/15 s.
    let span = frames[frames.len() - 1].captured_at - frames[0].captured_at;
    assert!(
        span >= Duration::from_millis(300),
        "eight frames in {span:?}"
    );
    let stats = cam.stats();
    assert_eq!(stats.status, CameraState::Online);
    assert!(stats.frames_in >= 8 && stats.delivered >= 8, "{stats:?}");
    assert_eq!(stats.reconnects, 0);
    stop_promptly(cam);
    assert_eq!(log.names(0), ["starting", "online"]);
}

#[test]
fn rtsp_outage_stays_reconnecting_while_retrying_and_recovers_on_the_same_port() {
    let mut server = RtspCamera::start();
    let port = server.port();
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let cam = spawn(0, fast("outage", Source::Uri(server.url())), &notify, &log);
    let slots = [Arc::clone(cam.slot())];
    assert!(
        log.wait_for(0, ONLINE_TIMEOUT, |s| *s == CameraState::Online),
        "{:?}",
        log.of(0)
    );
    // Online for longer than `stable_after` (0.5 s): the outage starts a fresh backoff.
    let before = take_frames(&notify, &slots, 12, Duration::from_secs(5));
    let last_seq_before = before.last().expect("a frame before the outage").seq;

    let outage = Instant::now();
    server.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the stopped server still accepts connections"
    );
    // The client sees it: a bus error or, at the latest, the no-frame watchdog (1.5 s).
    assert!(
        log.wait_for(0, Duration::from_secs(5), |s| *s
            == CameraState::Reconnecting),
        "no reconnecting after the outage: {:?}",
        log.of(0)
    );
    let detected = outage.elapsed();
    // Retrying (three failed attempts at least) is `reconnecting`, never `offline`.
    assert!(
        wait_until(Duration::from_secs(5), || cam.stats().reconnects >= 3),
        "{:?}",
        cam.stats()
    );
    assert_eq!(cam.status(), CameraState::Reconnecting);
    // Nothing new arrives while the server is down (drain what was in flight first).
    let _ = cam.slot().take();
    assert!(cam.slot().take().is_none());

    server.restart();
    assert_eq!(server.port(), port);
    assert!(
        log.wait_for_nth(0, 2, ONLINE_TIMEOUT, |s| *s == CameraState::Online),
        "not online again: {:?} / {:?}",
        log.of(0),
        cam.stats()
    );
    let after = take_frames(&notify, &slots, 2, Duration::from_secs(5));
    assert!(!after.is_empty(), "no frames after the restart");
    assert!(
        after[0].seq > last_seq_before,
        "seq reused: {} after {last_seq_before}",
        after[0].seq
    );
    let stats = cam.stats();
    assert!(stats.reconnects >= 3, "{stats:?}");
    assert!(stats.last_error.is_some());
    stop_promptly(cam);
    assert_eq!(
        log.names(0),
        ["starting", "online", "reconnecting", "online"],
        "detected after {detected:?}"
    );
}

#[test]
fn failing_cameras_never_affect_a_healthy_one() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let good = spawn(0, fast("good", test_pattern("")), &notify, &log);
    let refused = spawn(
        1,
        fast("refused", Source::Uri("rtsp://127.0.0.1:1/none".into())),
        &notify,
        &log,
    );
    let bogus = spawn(
        2,
        fast("bogus", Source::Uri("foo://x".into())),
        &notify,
        &log,
    );

    assert!(log.wait_for(2, Duration::from_secs(5), |s| matches!(
        s,
        CameraState::Error { .. }
    )));
    match log.of(2).last() {
        Some(CameraState::Error { reason, .. }) => {
            assert!(
                reason.contains("unsupported camera uri 'foo://x'"),
                "{reason}"
            );
            assert!(!reason.contains('\n'));
        }
        other => panic!("bogus camera status {other:?}"),
    }
    assert!(
        wait_until(Duration::from_secs(10), || refused.stats().reconnects >= 3),
        "refused camera not retrying: {:?}",
        log.of(1)
    );
    assert!(log.wait_for(0, ONLINE_TIMEOUT, |s| *s == CameraState::Online));

    // The good camera keeps delivering while the refused one keeps retrying.
    let retries_before = refused.stats().reconnects;
    let frames_before = good.stats().frames_in;
    let frames = take_frames(
        &notify,
        &[
            Arc::clone(good.slot()),
            Arc::clone(refused.slot()),
            Arc::clone(bogus.slot()),
        ],
        10,
        Duration::from_secs(5),
    );
    assert!(frames.len() >= 10 && frames.iter().all(|f| f.camera == 0));
    assert!(
        wait_until(Duration::from_secs(3), || refused.stats().reconnects
            > retries_before),
        "the refused camera stopped retrying"
    );
    assert!(good.stats().frames_in > frames_before);

    let refused_stats = refused.stats();
    assert!(
        refused_stats.frames_in == 0 && refused_stats.reconnects >= 3,
        "{refused_stats:?}"
    );
    assert!(
        refused_stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("rtspsrc")),
        "{refused_stats:?}"
    );
    assert_eq!(bogus.stats().reconnects, 0);

    // Stopping is prompt in every state: online, between retries, failed for good.
    for cam in [good, refused, bogus] {
        stop_promptly(cam);
    }
    assert_eq!(log.names(0), ["starting", "online"]);
    assert_eq!(
        log.names(1),
        ["starting", "reconnecting"],
        "{:?}",
        log.of(1)
    );
    assert_eq!(log.names(2), ["starting", "error"]);
    assert!(matches!(
        log.of(2).last(),
        Some(CameraState::Error {
            retrying: false,
            ..
        })
    ));
}

#[test]
fn slow_consumer_overwrites_the_slot_and_counts_drops() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let cam = spawn(0, fast("slow", test_pattern("")), &notify, &log);
    assert!(log.wait_for(0, ONLINE_TIMEOUT, |s| *s == CameraState::Online));
    // Nobody takes for a while: 30 fps overwrite one slot.
    assert!(
        wait_until(Duration::from_secs(5), || cam.stats().dropped >= 15),
        "{:?}",
        cam.stats()
    );
    let first = cam.slot().take().expect("a frame waits in the slot");
    std::thread::sleep(Duration::from_millis(300));
    let second = cam.slot().take().expect("a newer frame waits");
    assert!(
        second.seq > first.seq + 3,
        "seq {} then {}",
        first.seq,
        second.seq
    );
    let slot = Arc::clone(cam.slot());
    stop_promptly(cam);
    // Every delivered frame was numbered, and was either taken, dropped or is still waiting.
    let left = u64::from(slot.take().is_some());
    assert_eq!(slot.delivered(), slot.dropped() + 2 + left);
}

#[test]
fn max_fps_caps_delivery_and_counts_skips_separately() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let mut settings = fast("capped", test_pattern(""));
    settings.max_fps = Some(5.0);
    let cam = spawn(0, settings, &notify, &log);
    let slots = [Arc::clone(cam.slot())];
    assert!(log.wait_for(0, ONLINE_TIMEOUT, |s| *s == CameraState::Online));
    let _ = cam.slot().take();
    let window = Duration::from_secs(2);
    let started = Instant::now();
    let mut frames = Vec::new();
    while started.elapsed() < window {
        frames.extend(notify.take_any(&slots, window.saturating_sub(started.elapsed())));
    }
    let secs = started.elapsed().as_secs_f64();
    let n = frames.len() as f64;
    assert!(
        n <= 5.0 * secs + 1.5 && n >= 5.0 * secs * 0.6,
        "{n} frames in {secs:.2} s at max_fps 5"
    );
    for pair in frames.windows(2) {
        let gap = pair[1].captured_at - pair[0].captured_at;
        assert!(gap >= Duration::from_millis(140), "frames {gap:?} apart");
        assert_eq!(pair[1].seq, pair[0].seq + 1, "capped frames are not drops");
    }
    let slot = Arc::clone(cam.slot());
    let stats_before_stop = cam.stats();
    stop_promptly(cam);
    assert!(
        stats_before_stop.skipped_rate as f64 >= n,
        "{stats_before_stop:?}"
    );
    assert_eq!(slot.dropped(), 0);
}

#[test]
fn pipeline_sources_wrapped_own_appsink_and_scaled() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    // 518 px wide: 1554 bytes of RGB per row, padded to 1556.
    let wrapped = spawn(
        0,
        fast(
            "wrapped",
            Source::Pipeline(
                "videotestsrc is-live=true pattern=red ! video/x-raw,width=518,height=32,framerate=30/1".into(),
            ),
        ),
        &notify,
        &log,
    );
    let own_sink = spawn(
        1,
        fast(
            "own-sink",
            Source::Pipeline(
                "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 \
                 ! videoconvert ! appsink name=sink sync=false"
                    .into(),
            ),
        ),
        &notify,
        &log,
    );
    let mut scaled_settings = fast("scaled", test_pattern(""));
    scaled_settings.scale = Some((100, 50));
    let scaled = spawn(2, scaled_settings, &notify, &log);

    let slots: Vec<_> = [&wrapped, &own_sink, &scaled]
        .iter()
        .map(|c| Arc::clone(c.slot()))
        .collect();
    let mut seen = [None, None, None];
    let deadline = Instant::now() + ONLINE_TIMEOUT;
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        for f in notify.take_any(&slots, Duration::from_millis(500)) {
            let i = f.camera;
            seen[i] = Some(f);
        }
    }
    let [Some(red), Some(own), Some(small)] = seen else {
        panic!("missing frames: {:?}", [log.of(0), log.of(1), log.of(2)]);
    };
    assert_eq!((red.width, red.height, red.stride), (518, 32, 1556));
    assert_eq!(red.data.len(), 1556 * 32);
    assert_eq!(red.row(31).map(<[u8]>::len), Some(1554));
    let [r, g, b] = red.pixel(517, 31).expect("pixel");
    assert!(
        r > 200 && g < 60 && b < 60,
        "red pattern came out as {r},{g},{b}"
    );
    assert_eq!((own.width, own.height, own.stride), (64, 48, 192));
    assert_eq!((small.width, small.height), (100, 50));
    assert!(small.stride >= 300 && small.data.len() == small.stride * 50);
    for cam in [wrapped, own_sink, scaled] {
        stop_promptly(cam);
    }
}

#[test]
fn unusable_pipelines_report_error_and_do_not_retry() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let cases = [
        ("missing", "nosuchelement_xyz ! fakesink", "no element"),
        (
            "not-appsink",
            "videotestsrc ! fakesink name=sink",
            "must be an appsink",
        ),
        ("syntax", "videotestsrc ! ! ! (", "does not parse"),
    ];
    let cams: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (name, desc, _))| {
            spawn(
                i,
                fast(name, Source::Pipeline((*desc).into())),
                &notify,
                &log,
            )
        })
        .collect();
    for (i, (name, _, expected)) in cases.iter().enumerate() {
        assert!(
            log.wait_for(i, Duration::from_secs(5), |s| matches!(
                s,
                CameraState::Error { .. }
            )),
            "{name}: {:?}",
            log.of(i)
        );
        let CameraState::Error { reason, .. } = cams[i].status() else {
            panic!("{name}: {:?}", cams[i].status());
        };
        assert!(reason.contains(expected), "{name}: {reason}");
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, cam) in cams.into_iter().enumerate() {
        assert_eq!(cam.stats().reconnects, 0);
        stop_promptly(cam);
        assert_eq!(log.names(i), ["starting", "error"]);
    }
}

#[test]
fn no_frame_watchdog_restarts_a_silent_pipeline() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let mut settings = fast(
        "silent",
        Source::Pipeline("videotestsrc is-live=true ! valve drop=true".into()),
    );
    settings.no_frame_timeout = Duration::from_millis(400);
    let cam = spawn(0, settings, &notify, &log);
    assert!(
        wait_until(Duration::from_secs(5), || cam.stats().reconnects >= 2),
        "{:?}",
        log.of(0)
    );
    let stats = cam.stats();
    assert!(
        stats
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("watchdog")),
        "{stats:?}"
    );
    stop_promptly(cam);
    assert_eq!(log.names(0), ["starting", "reconnecting"]);
}

#[test]
fn file_clip_loops_at_its_end_without_a_status_change() {
    anomalyclip_edge::camera::init().expect("gstreamer");
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = dir.path().join("clip.mp4");
    write_clip(&clip);
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let uri = format!("file://{}", clip.display());
    let cam = spawn(0, fast("clip", Source::Uri(uri)), &notify, &log);
    // The clip holds 10 frames (0.67 s at 15 fps); 30 frames need at least two loops.
    assert!(
        wait_until(Duration::from_secs(10), || cam.stats().frames_in >= 30),
        "{:?} / {:?}",
        cam.stats(),
        log.of(0)
    );
    let stats = cam.stats();
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    let f = cam.slot().take().expect("a frame");
    assert_eq!((f.width, f.height), (160, 120));
    stop_promptly(cam);
    assert_eq!(log.names(0), ["starting", "online"]);
}

/// Encodes a 10-frame H.264 MP4 clip at `path`. (openh264enc prints a harmless
/// `cmInitParaError` while draining at the end.)
fn write_clip(path: &std::path::Path) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers=10 ! video/x-raw,width=160,height=120,framerate=15/1 \
         ! videoconvert ! openh264enc ! h264parse ! mp4mux ! filesink location=\"{}\"",
        path.display()
    ))
    .expect("clip pipeline");
    pipeline.set_state(gst::State::Playing).expect("play");
    let bus = pipeline.bus().expect("bus");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(10),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("clip written within 10 s");
    assert!(matches!(msg.view(), gst::MessageView::Eos(_)), "{msg:?}");
    pipeline.set_state(gst::State::Null).expect("null");
}

#[test]
fn stop_interrupts_a_long_backoff() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let mut settings = fast("backoff", Source::Uri("rtsp://127.0.0.1:1/none".into()));
    settings.backoff_initial = Duration::from_secs(20);
    settings.backoff_max = Duration::from_secs(60);
    let cam = spawn(0, settings, &notify, &log);
    assert!(log.wait_for(0, Duration::from_secs(5), |s| *s
        == CameraState::Reconnecting));
    stop_promptly(cam);
}

#[test]
fn http_mjpeg_camera_delivers_frames() {
    let mut server = common::mjpeg::MjpegCamera::start(80, 60, [0, 0, 255], 20);
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let cam = spawn(0, fast("mjpeg", Source::Uri(server.url())), &notify, &log);
    let frames = take_frames(&notify, &[Arc::clone(cam.slot())], 3, ONLINE_TIMEOUT);
    assert!(frames.len() >= 3, "{:?} / {:?}", log.of(0), cam.stats());
    let f = &frames[2];
    assert_eq!((f.width, f.height), (80, 60));
    let [r, g, b] = f.pixel(40, 30).expect("pixel");
    assert!(b > 200 && r < 60 && g < 60, "blue came out as {r},{g},{b}");
    server.stop();
    assert!(
        log.wait_for(0, Duration::from_secs(5), |s| *s
            == CameraState::Reconnecting),
        "{:?}",
        log.of(0)
    );
    stop_promptly(cam);
}

#[test]
fn missing_decoder_reports_error_and_keeps_retrying_slowly() {
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    // A stream nobody can decode: decodebin posts "missing a plug-in" (codec not found).
    let cam = spawn(
        0,
        fast(
            "no-decoder",
            Source::Pipeline(
                "fakesrc is-live=true sizetype=fixed sizemax=100 filltype=zero \
                 ! video/x-h266 ! queue ! decodebin"
                    .into(),
            ),
        ),
        &notify,
        &log,
    );
    assert!(
        log.wait_for(0, Duration::from_secs(5), |s| matches!(
            s,
            CameraState::Error { .. }
        )),
        "{:?}",
        log.of(0)
    );
    let CameraState::Error {
        reason,
        retrying: true,
    } = cam.status()
    else {
        panic!("{:?}", cam.status());
    };
    assert!(
        reason.contains("missing a plug-in") && reason.contains("video/x-h266"),
        "{reason}"
    );
    // Retried every backoff_max (400 ms here), staying in Error rather than flapping.
    assert!(
        wait_until(Duration::from_secs(5), || cam.stats().reconnects >= 2),
        "{:?}",
        cam.stats()
    );
    stop_promptly(cam);
    assert_eq!(log.names(0), ["starting", "error"]);
}

#[test]
fn a_camera_that_accepts_but_never_answers_hits_the_watchdog_and_stops_promptly() {
    // The TCP handshake completes (listen backlog) but no RTSP reply ever comes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    let mut settings = fast(
        "mute",
        Source::Uri(format!("rtsp://u:secret@127.0.0.1:{port}/x")),
    );
    settings.no_frame_timeout = Duration::from_millis(500);
    let cam = spawn(0, settings, &notify, &log);
    assert!(
        log.wait_for(0, Duration::from_secs(5), |s| *s
            == CameraState::Reconnecting),
        "{:?}",
        log.of(0)
    );
    let stats = cam.stats();
    let error = stats.last_error.unwrap_or_default();
    assert!(
        error.contains("no first frame") && error.contains("watchdog"),
        "{error}"
    );
    // Stopped while rtspsrc waits for the DESCRIBE reply.
    assert!(wait_until(Duration::from_secs(5), || cam
        .stats()
        .reconnects
        >= 1));
    std::thread::sleep(Duration::from_millis(100));
    stop_promptly(cam);
    drop(listener);
}

#[test]
fn camera_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Camera>();
    send_sync::<Frame>();
    send_sync::<LatestSlot>();
    send_sync::<FrameNotify>();
    send_sync::<CameraState>();
}

#[test]
fn rtsp_over_tcp_interleaved_delivers_frames() {
    let server = RtspCamera::start();
    let (notify, log) = (FrameNotify::new(), StatusLog::new());
    // `rtspt://` makes rtspsrc carry RTP inside the RTSP TCP connection (cameras behind NAT).
    let url = server.url().replacen("rtsp://", "rtspt://", 1);
    let cam = spawn(0, fast("tcp", Source::Uri(url)), &notify, &log);
    let frames = take_frames(&notify, &[Arc::clone(cam.slot())], 3, ONLINE_TIMEOUT);
    assert!(frames.len() >= 3, "{:?} / {:?}", log.of(0), cam.stats());
    assert_eq!((frames[0].width, frames[0].height), (320, 240));
    stop_promptly(cam);
}

#[test]
fn camera_states_map_to_the_one_wire_status_and_never_to_offline() {
    use anomalyclip_edge::payload::CameraStatus;
    assert_eq!(CameraState::Starting.wire(), None);
    assert_eq!(CameraState::Online.wire(), Some(CameraStatus::Online));
    assert_eq!(
        CameraState::Reconnecting.wire(),
        Some(CameraStatus::Reconnecting)
    );
    for retrying in [false, true] {
        let state = CameraState::Error {
            reason: "no decoder".into(),
            retrying,
        };
        assert_eq!(
            state.wire().map(|s| s.payload()).as_deref(),
            Some("error: no decoder")
        );
    }
}
