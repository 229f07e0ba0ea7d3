//! Config loading and `check-config` validation: every problem at once, each with its TOML path
//! and line; good files load; nothing panics.

use std::path::Path;

use anomalyclip_edge::camera::Source;
use anomalyclip_edge::config::{
    self, Backend, ConfigErrors, FsChecks, Problem, check, example_config, load_config,
    parse_config,
};
use anomalyclip_edge::payload::MaskKind;

/// 1-based line of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

fn problems(text: &str) -> Vec<Problem> {
    match parse_config(text, "config.toml", FsChecks::Enabled) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems,
    }
}

/// Asserts one problem with this path, on the line of `needle`, whose message contains `msg`.
fn expect(ps: &[Problem], text: &str, path: &str, needle: &str, msg: &str) {
    let line = line_of(text, needle);
    assert!(
        ps.iter()
            .any(|p| p.path == path && p.line == Some(line) && p.message.contains(msg)),
        "no problem {path} at line {line} containing {msg:?}; got:\n{}",
        ConfigErrors {
            problems: ps.to_vec()
        }
    );
}

/// A model package directory good enough for the config check (it only looks for the manifest).
fn model_dir(dir: &Path) -> String {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).expect("mkdir");
    std::fs::write(pkg.join("manifest.toml"), "format_version = 1\n").expect("manifest");
    pkg.display().to_string()
}

#[test]
fn example_and_demo_parse() {
    let cfg = parse_config(example_config(), "example.toml", FsChecks::Disabled)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.node_id, "line1-station3");
    assert_eq!(cfg.cameras.len(), 2);
    assert!(matches!(&cfg.cameras[0].source, Source::Uri(u) if u.starts_with("rtsp://")));
    assert!(matches!(cfg.cameras[1].source, Source::Pipeline(_)));
    assert_eq!(cfg.cameras[0].alarm.raise_count, 3);
    assert_eq!(
        cfg.mqtt.prefix_for(&cfg.node_id),
        "anomalyclip/line1-station3"
    );

    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("read demo.toml");
    let cfg =
        parse_config(&demo, "demo.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.engine.backend, Backend::Cpu);
    assert_eq!((cfg.mqtt.host.as_str(), cfg.mqtt.port), ("127.0.0.1", 1883));
    assert_eq!(cfg.state_dir, Path::new(".state/demo"));
    match &cfg.cameras[0].source {
        Source::Pipeline(p) => assert!(p.ends_with("appsink name=sink")),
        other => panic!("{other:?}"),
    }
}

/// `[metrics]`: absent in the example (nothing listens); uncommented, the documented default;
/// a bad address or an unknown key is a problem at its line.
#[test]
fn the_metrics_table_parses_and_its_problems_have_lines() {
    let example = example_config();
    let cfg =
        parse_config(example, "example.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.metrics, None);
    let enabled = example.replace("# [metrics]\n", "[metrics]\n").replace(
        "# listen = \"127.0.0.1:9464\"",
        "listen = \"127.0.0.1:9464\"",
    );
    assert_ne!(enabled, example, "the example documents [metrics]");
    let cfg = parse_config(&enabled, "example.toml", FsChecks::Disabled)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.metrics.map(|m| m.listen),
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    let bare = enabled.replace("listen = \"127.0.0.1:9464\"", "");
    let cfg =
        parse_config(&bare, "example.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.metrics.map(|m| m.listen.to_string()),
        Some(anomalyclip_edge::metrics::config::DEFAULT_LISTEN.to_owned())
    );

    let bad = enabled.replace(
        "listen = \"127.0.0.1:9464\"",
        "listen = \"[::1]\"\nport = 9464",
    );
    let ps = match parse_config(&bad, "example.toml", FsChecks::Disabled) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems,
    };
    expect(
        &ps,
        &bad,
        "metrics.port",
        "port = 9464",
        "unknown field `port`",
    );
    expect(
        &ps,
        &bad,
        "metrics.listen",
        "listen = \"[::1]\"",
        "\"[::1]\" is not an address (expected IP:port",
    );
    assert_eq!(ps.len(), 2, "{ps:?}");
}

#[test]
fn minimal_file_loads_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = model_dir(dir.path());
    let text = format!(
        "node_id = \"n1\"\n[model]\npackage = {pkg:?}\n[mqtt]\nhost = \"localhost\"\n\
         [[camera]]\nname = \"cam\"\nuri = \"/dev/video0\"\n"
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).expect("write");
    let cfg = load_config(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.state_dir, config::default_state_dir());
    assert_eq!(cfg.stats_interval, Some(std::time::Duration::from_secs(10)));
    assert_eq!(cfg.engine.backend, Backend::Auto);
    assert_eq!(cfg.mqtt.port, 1883);
    let cam = &cfg.cameras[0];
    assert_eq!(cam.source, Source::Uri("/dev/video0".into()));
    assert_eq!(cam.max_fps, None);
    assert_eq!((cam.threshold, cam.pixel_threshold), (0.5, 0.5));
    assert_eq!(cam.mask.kind, MaskKind::GrayMap);
    assert!(cam.mask.enabled && cam.mask.only_on_anomaly);

    // check-config on the same minimal file also needs a real package (it verifies every hash)
    // and a state directory it can write in.
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny");
    let state = dir.path().join("state");
    let text = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {tiny:?}\n[mqtt]\nhost = \"localhost\"\n\
         [[camera]]\nname = \"cam\"\nuri = \"/dev/video0\"\n",
        state.display().to_string()
    );
    std::fs::write(&path, &text).expect("write");
    assert_eq!(check(&path), Vec::new());
    assert!(
        state.is_dir(),
        "check-config creates the state directory as run would"
    );
}

#[test]
fn the_issue_example_line_is_exact() {
    let text = "node_id = \"n\"\n[model]\npackage = \"/nonexistent\"\n[mqtt]\nhost = \"h\"\n\
                [[camera]]\nname = \"a\"\nuri = \"rtsp://cam/1\"\n\n\n\n[[camera]]\nname = \"b\"\n\
                uri = \"ftp://cam/2\"\n";
    let err = parse_config(text, "config.toml", FsChecks::Disabled).expect_err("bad");
    assert_eq!(
        err.to_string(),
        "config.toml:14: camera[1].uri: unsupported scheme \"ftp\" (expected rtsp, file, http, https or /dev/video*)"
    );
}

#[test]
fn every_problem_at_once_with_path_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = model_dir(dir.path());
    let missing = dir.path().join("nope");
    let text = format!(
        r#"node_id = "station 1"
colour = "blue"
stats_interval_s = "ten"

[model]
package = {pkg:?}

[engine]
backend = "gpu"
max_batch = 0

[mqtt]
host = "broker"
port = 70000
username = "u"
password_file = "{missing}/password"
result_qos = 3
topic_prefix = "plant/#"
bogus = 1

[mqtt.tls]
ca_file = "{missing}/ca.pem"
client_cert_file = "{missing}/client.pem"

[[camera]]
name = "cam-1"
uri = "rtsp://10.0.0.1/stream"
threshold = 1.5
pixel_threshold = -0.1

[camera.alarm]
raise_count = 6
raise_window = 5

[[camera]]
name = "cam-2"
uri = "ftp://10.0.0.2/x"
max_fps = -1

[[camera]]
name = "cam-1"
uri = "rtsp://10.0.0.3/stream"
pipeline = "videotestsrc ! appsink name=sink"

[[camera]]
name = "cam-4"
pipeline = "  "

[[camera]]
name = "cam-5"

[[camera]]
name = "cam-6"
uri = "/dev/videoX"
[camera.mask]
kind = "colour"
size = 4096
"#,
        missing = missing.display()
    );
    let ps = problems(&text);
    expect(
        &ps,
        &text,
        "node_id",
        "node_id =",
        "invalid name \"station 1\"",
    );
    expect(&ps, &text, "colour", "colour =", "unknown field `colour`");
    expect(
        &ps,
        &text,
        "stats_interval_s",
        "stats_interval_s",
        "invalid type",
    );
    expect(
        &ps,
        &text,
        "engine.backend",
        "backend =",
        "unknown variant `gpu`",
    );
    expect(
        &ps,
        &text,
        "engine.max_batch",
        "max_batch =",
        "out of range",
    );
    expect(&ps, &text, "mqtt.port", "port = 70000", "");
    expect(
        &ps,
        &text,
        "mqtt.password_file",
        "password_file",
        "cannot read password file",
    );
    expect(
        &ps,
        &text,
        "mqtt.result_qos",
        "result_qos",
        "QoS 3 does not exist",
    );
    expect(&ps, &text, "mqtt.topic_prefix", "topic_prefix", "wildcard");
    expect(&ps, &text, "mqtt.bogus", "bogus", "unknown field `bogus`");
    expect(
        &ps,
        &text,
        "mqtt.tls.ca_file",
        "ca_file",
        "cannot read CA file",
    );
    expect(
        &ps,
        &text,
        "mqtt.tls.client_cert_file",
        "client_cert_file",
        "cannot read client certificate",
    );
    expect(
        &ps,
        &text,
        "mqtt.tls.client_key_file",
        "client_cert_file",
        "needs client_key_file",
    );
    expect(
        &ps,
        &text,
        "camera[0].threshold",
        "threshold = 1.5",
        "outside [0, 1]",
    );
    expect(
        &ps,
        &text,
        "camera[0].pixel_threshold",
        "pixel_threshold = -0.1",
        "outside [0, 1]",
    );
    expect(
        &ps,
        &text,
        "camera[0].alarm.raise_count",
        "raise_count = 6",
        "larger than raise_window",
    );
    expect(
        &ps,
        &text,
        "camera[1].uri",
        "ftp://",
        "unsupported scheme \"ftp\" (expected rtsp, file, http, https or /dev/video*)",
    );
    expect(
        &ps,
        &text,
        "camera[1].max_fps",
        "max_fps = -1",
        "out of range",
    );
    let dup_line = line_of(&text, "uri = \"rtsp://10.0.0.3") - 1;
    assert!(
        ps.iter().any(|p| p.path == "camera[2].name"
            && p.line == Some(dup_line)
            && p.message.contains("duplicate camera name \"cam-1\"")),
        "{ps:#?}"
    );
    expect(
        &ps,
        &text,
        "camera[2].uri",
        "10.0.0.3",
        "either uri or pipeline",
    );
    expect(
        &ps,
        &text,
        "camera[3].pipeline",
        "pipeline = \"  \"",
        "the pipeline description is empty",
    );
    expect(&ps, &text, "camera[5].uri", "/dev/videoX", "/dev/videoN");
    expect(
        &ps,
        &text,
        "camera[5].mask.kind",
        "kind = \"colour\"",
        "unknown variant `colour`",
    );
    expect(
        &ps,
        &text,
        "camera[5].mask.size",
        "size = 4096",
        "out of range",
    );
    // camera[4] has no source: reported at its table.
    assert!(
        ps.iter()
            .any(|p| p.path == "camera[4]" && p.message.contains("no source")),
        "{ps:#?}"
    );
    // Sorted by line, one line of output per problem, each "file:line: path: message".
    let lines: Vec<usize> = ps.iter().filter_map(|p| p.line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]));
    let shown = ConfigErrors {
        problems: ps.clone(),
    }
    .to_string();
    assert_eq!(shown.lines().count(), ps.len());
    assert!(
        shown.lines().all(|l| l.starts_with("config.toml:")),
        "{shown}"
    );
    assert!(ps.len() >= 25, "{} problems:\n{shown}", ps.len());
}

#[test]
fn missing_required_keys_and_sections() {
    let ps = problems("[mqtt]\nport = 1883\n");
    let paths: Vec<&str> = ps.iter().map(|p| p.path.as_str()).collect();
    for want in ["node_id", "model", "mqtt.host", "camera"] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let ps2 = problems("[mqtt]\nhost = \"h\"\nreconnect_min_ms = 10\nreconnect_max_ms = 5\n");
    assert!(
        ps2.iter().any(|p| p.path == "mqtt.reconnect_max_ms"
            && p.line == Some(4)
            && p.message.contains("below reconnect_min_ms")),
        "{ps2:#?}"
    );
    let ps3 = problems("[mqtt]\nhost = \"h\"\nreconnect_min_ms = 60000\n");
    assert!(
        ps3.iter()
            .any(|p| p.path == "mqtt.reconnect_min_ms" && p.line == Some(3)),
        "{ps3:#?}"
    );
    let host = ps.iter().find(|p| p.path == "mqtt.host").expect("host");
    assert_eq!(host.line, Some(1), "reported at the [mqtt] table");
}

#[test]
fn credentials_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = model_dir(dir.path());
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").expect("pw");
    let base = |mqtt: &str| {
        format!(
            "node_id = \"n\"\n[model]\npackage = {pkg:?}\n[mqtt]\nhost = \"h\"\n{mqtt}\n\
             [[camera]]\nname = \"c\"\nuri = \"rtsp://x/y\"\n"
        )
    };
    // Password file: read, newline trimmed, hidden in Debug.
    let text = base(&format!(
        "username = \"u\"\npassword_file = {:?}",
        pw.display().to_string()
    ));
    let cfg = parse_config(&text, "c.toml", FsChecks::Enabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.mqtt.password.as_ref().map(|s| s.0.as_str()),
        Some("s3cret")
    );
    assert!(!format!("{cfg:?}").contains("s3cret"));
    // Both forms, and a password without a user.
    let text = base(&format!(
        "password = \"x\"\npassword_file = {:?}",
        pw.display().to_string()
    ));
    let ps = problems(&text);
    expect(&ps, &text, "mqtt.password", "password = \"x\"", "not both");
    expect(
        &ps,
        &text,
        "mqtt.username",
        "password = \"x\"",
        "needs a username",
    );
    // TLS present without a CA; port defaults to 8883 with TLS.
    let text = base("[mqtt.tls]\nclient_key_file = \"/nonexistent/k\"");
    let ps = problems(&text);
    expect(&ps, &text, "mqtt.tls.ca_file", "[mqtt.tls]", "missing");
    expect(
        &ps,
        &text,
        "mqtt.tls.client_cert_file",
        "client_key_file",
        "needs client_cert_file",
    );
    // A real CA certificate is accepted.
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem");
    let text = base(&format!(
        "[mqtt.tls]\nca_file = {:?}",
        ca.display().to_string()
    ));
    let cfg = parse_config(&text, "c.toml", FsChecks::Enabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.mqtt.port, 8883);
    // A file that is not PEM is refused.
    let text = base(&format!(
        "[mqtt.tls]\nca_file = {:?}",
        pw.display().to_string()
    ));
    let ps = problems(&text);
    expect(
        &ps,
        &text,
        "mqtt.tls.ca_file",
        "ca_file",
        "does not look like a PEM certificate",
    );
}

#[test]
fn syntax_errors_are_reported_with_lines_and_stop_there() {
    let text = "node_id = \"n\"\n\n[mqtt\nhost = \"h\"\nport = = 3\n";
    let ps = problems(text);
    assert!(!ps.is_empty());
    assert!(
        ps.iter().all(|p| p.path.is_empty() && p.line.is_some()),
        "{ps:#?}"
    );
    assert!(ps.iter().any(|p| p.line == Some(3)), "{ps:#?}");
}

#[test]
fn file_sources_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = model_dir(dir.path());
    let video = dir.path().join("v.mp4");
    std::fs::write(&video, b"x").expect("video");
    let text = format!(
        "node_id = \"n\"\n[model]\npackage = {pkg:?}\n[mqtt]\nhost = \"h\"\n\
         [[camera]]\nname = \"a\"\nuri = \"file://{}\"\n\
         [[camera]]\nname = \"b\"\nuri = \"file://{}/missing.mp4\"\n",
        video.display(),
        dir.path().display()
    );
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    expect(&ps, &text, "camera[1].uri", "missing.mp4", "not found");
}

#[test]
fn model_package_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "node_id = \"n\"\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\n[[camera]]\nname = \"a\"\nuri = \"rtsp://x/y\"\n",
        dir.path().display().to_string()
    );
    let ps = problems(&text);
    expect(&ps, &text, "model.package", "package", "no manifest.toml");
}

#[test]
fn unreadable_config_file_is_one_problem() {
    let err = load_config("/nonexistent/config.toml").expect_err("missing");
    assert_eq!(err.problems.len(), 1);
    assert!(
        err.to_string()
            .starts_with("/nonexistent/config.toml: cannot read config file")
    );
}

#[test]
fn odd_documents_never_panic() {
    let docs = [
        "",
        "camera = 5",
        "camera = []",
        "camera = [1, 2]",
        "[[camera]]",
        "[[camera]]\n[[camera]]\nname = 5",
        "mqtt = \"x\"\nmodel = 3\nengine = []",
        "[mqtt]\n[mqtt.tls]\n[mqtt.tls.extra]\na = 1",
        "node_id = \"\"\nstate_dir = \"\"",
        "[camera]\nname = \"a\"",
        "[[camera]]\nname = \"a\"\nalarm = 5\nmask = { kind = 1 }",
        "[[camera]]\nname = \"a\"\n[camera.alarm]\nraise_count = -1\nraise_window = 1.5\nclear_count = 0",
        "[mqtt]\nhost = \"\"\nport = 0\nkeep_alive_s = -5\nreconnect_min_ms = 10\nreconnect_max_ms = 5",
        "a.b.c.d = 1\n'quoted key' = 2\n\"x\".y = { z = [1, { w = 2 }] }",
        "\u{feff}node_id = \"bom\"",
        "node_id = \"n\"\nnode_id = \"m\"",
    ];
    for doc in docs {
        let err = parse_config(doc, "x.toml", FsChecks::Enabled).expect_err(doc);
        assert!(!err.problems.is_empty(), "{doc}");
        for p in &err.problems {
            assert!(!p.message.is_empty(), "{doc}: {p:?}");
            if let Some(l) = p.line {
                assert!(l >= 1 && l <= doc.lines().count().max(1), "{doc}: {p:?}");
            }
        }
    }
}

/// `[commands]`: absent in the example (off); uncommented, every command by default or the
/// `allow` list; an unknown command name is a problem at its line. `latch` is documented.
#[test]
fn the_commands_table_parses_and_names_an_unknown_command() {
    let example = example_config();
    let cfg =
        parse_config(example, "example.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.commands, None, "commands are off by default");
    assert!(cfg.cameras.iter().all(|c| !c.alarm.latch));
    let on = example.replace("# [commands]\n", "[commands]\n");
    assert_ne!(on, example, "the example documents [commands]");
    let cfg =
        parse_config(&on, "example.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    let allow = cfg.commands.expect("on").allow;
    assert_eq!(
        allow.len(),
        anomalyclip_edge::commands::config::COMMANDS.len()
    );
    let some = on.replace(
        "# allow = [\"set_thresholds\", \"ack_alarm\"]",
        "allow = [\"set_thresholds\", \"ack_alarm\"]",
    );
    let cfg =
        parse_config(&some, "example.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.commands.expect("on").allow,
        ["set_thresholds", "ack_alarm"]
    );
    let bad = some.replace("\"ack_alarm\"]", "\"reboot\"]");
    let e = parse_config(&bad, "example.toml", FsChecks::Disabled).expect_err("unknown command");
    let text = e.to_string();
    assert!(
        text.contains("commands.allow") && text.contains("\"reboot\" is not a command"),
        "{text}"
    );
    let latched = example.replace("latch = false", "latch = true");
    assert_ne!(latched, example, "the example documents latch");
    let cfg = parse_config(&latched, "example.toml", FsChecks::Disabled)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.cameras[0].alarm.latch);
}
