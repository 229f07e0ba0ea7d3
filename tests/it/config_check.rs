//! `check-config` refuses everything `run` would refuse at start, with the camera's own source
//! check, and never shows a secret: regression tests for configs that passed `check-config`
//! (as `ExecStartPre=`) and then failed or misbehaved in `run`, and for sources that the
//! config refused although the camera accepts them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anomalyclip_edge::config::{FsChecks, Problem, check, parse_config};

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

fn tiny() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny")
}

fn tls(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
        .display()
        .to_string()
}

/// A complete, valid config in `dir` (tiny package, state dir inside `dir`) with `mqtt` lines
/// added to `[mqtt]` and `cameras` as the camera tables; returns its path.
fn write_config(dir: &Path, mqtt: &str, cameras: &str) -> PathBuf {
    let state = dir.join("state");
    let text = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {:?}\n[mqtt]\nhost = \"localhost\"\n\
         {mqtt}\n{cameras}",
        state.display().to_string(),
        tiny()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

const CAMERA: &str = "[[camera]]\nname = \"cam\"\nuri = \"rtsp://127.0.0.1/s\"\n";

/// The problems at `path` (a TOML path), as lines.
fn at(ps: &[Problem], path: &str) -> Vec<String> {
    ps.iter()
        .filter(|p| p.path == path)
        .map(ToString::to_string)
        .collect()
}

fn assert_one(ps: &[Problem], path: &str, fragment: &str) {
    let got = at(ps, path);
    assert!(
        got.len() == 1 && got[0].contains(fragment),
        "expected one problem at {path} containing {fragment:?}; all problems: {ps:#?}"
    );
}

#[test]
fn a_good_config_passes_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "", CAMERA);
    assert_eq!(check(&path), Vec::new());
}

#[test]
fn rtsps_and_the_other_rtsp_schemes_the_camera_accepts_pass_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cameras = "[[camera]]\nname = \"a\"\nuri = \"rtsps://10.0.0.5:322/s1\"\n\
                   [[camera]]\nname = \"b\"\nuri = \"rtspt://u:p@10.0.0.6/s1\"\n\
                   [[camera]]\nname = \"c\"\nuri = \"RTSP://10.0.0.7/s1\"\n";
    let path = write_config(dir.path(), "", cameras);
    assert_eq!(check(&path), Vec::new());
}

#[test]
fn a_pipeline_without_appsink_that_the_camera_accepts_passes_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No `appsink name=sink`: the camera appends its own tail (camera::Source::Pipeline).
    let cameras = "[[camera]]\nname = \"a\"\n\
                   pipeline = \"videotestsrc is-live=true ! video/x-raw,width=64,height=48\"\n\
                   [[camera]]\nname = \"b\"\npipeline = \"videotestsrc ! videoconvert ! appsink name=sink\"\n";
    let path = write_config(dir.path(), "", cameras);
    assert_eq!(check(&path), Vec::new());
}

#[test]
fn a_pipeline_with_an_unknown_element_is_refused_naming_the_element() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cameras = "[[camera]]\nname = \"a\"\npipeline = \"nosuchelement ! appsink name=sink\"\n\
                   [[camera]]\nname = \"b\"\npipeline = \"videotestsrc ! autovideosink\"\n";
    let path = write_config(dir.path(), "", cameras);
    let ps = check(&path);
    assert_one(&ps, "camera[0].pipeline", "nosuchelement");
    // An element without a source pad cannot feed the appended tail: GStreamer says so.
    assert_one(&ps, "camera[1].pipeline", "pipeline does not parse");
    assert_eq!(ps.len(), 2, "{ps:#?}");
    // `run` loads the same file with its cheaper checks: the camera reports `error: …` at run
    // time instead, so one bad camera never stops the others.
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(parse_config(&text, "config.toml", FsChecks::Enabled).is_ok());
}

#[test]
fn an_unwritable_state_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Exists but nobody, not even root, can create a file in it.
    let text = format!(
        "node_id = \"n1\"\nstate_dir = \"/proc/self\"\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\n{CAMERA}",
        tiny()
    );
    let path = dir.path().join("a.toml");
    std::fs::write(&path, text).expect("write");
    let ps = check(&path);
    assert_one(&ps, "state_dir", "cannot write in the state directory");
    assert_eq!(ps[0].line, Some(2), "{ps:#?}");

    // Missing and cannot be created: a file stands where a parent directory should be.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").expect("blocker");
    let text = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\n{CAMERA}",
        blocker.join("state").display().to_string(),
        tiny()
    );
    std::fs::write(&path, text).expect("write");
    let ps = check(&path);
    assert_one(&ps, "state_dir", "cannot create the state directory");

    // A file with other problems: the missing directory is not created (run would not create
    // it either), but an unwritable place for it is still reported with the rest.
    let text = format!(
        "node_id = \"n1\"\nstate_dir = \"/proc/self/state\"\n[model]\npackage = {:?}\n\
         [mqtt]\nhost = \"h\"\nport = 0\n{CAMERA}",
        tiny()
    );
    std::fs::write(&path, text).expect("write");
    let ps = check(&path);
    assert_one(&ps, "state_dir", "cannot create the state directory");
    assert_one(&ps, "mqtt.port", "port 0");
    let missing = dir.path().join("not-created");
    let text = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {:?}\n\
         [mqtt]\nhost = \"h\"\nport = 0\n{CAMERA}",
        missing.display().to_string(),
        tiny()
    );
    std::fs::write(&path, text).expect("write");
    let ps = check(&path);
    assert_eq!(ps.len(), 1, "{ps:#?}");
    assert!(
        !missing.exists(),
        "a file with problems must not create the state directory"
    );

    // The probe file is gone after a good check.
    let path = write_config(dir.path(), "", CAMERA);
    assert_eq!(check(&path), Vec::new());
    let left: Vec<_> = std::fs::read_dir(dir.path().join("state"))
        .expect("state dir")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn garbage_inside_pem_markers_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage_cert = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage_cert,
        "-----BEGIN CERTIFICATE-----\nMIIBbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let garbage_key = dir.path().join("garbage.key");
    std::fs::write(
        &garbage_key,
        "-----BEGIN PRIVATE KEY-----\nMIIBbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let bad_base64 = dir.path().join("bad64.pem");
    std::fs::write(
        &bad_base64,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let two_keys = dir.path().join("two.key");
    let key = std::fs::read_to_string(tls("client.key")).expect("key");
    std::fs::write(&two_keys, format!("{key}{key}")).expect("write");

    let tls_table = |ca: &Path, cert: &str, key: &Path| {
        format!(
            "[mqtt.tls]\nca_file = {:?}\nclient_cert_file = {cert:?}\nclient_key_file = {:?}\n",
            ca.display().to_string(),
            key.display().to_string()
        )
    };
    // The good fixtures pass.
    let good = tls_table(
        Path::new(&tls("ca.pem")),
        &tls("client.pem"),
        Path::new(&tls("client.key")),
    );
    let path = write_config(dir.path(), &good, CAMERA);
    assert_eq!(check(&path), Vec::new());

    let bad = tls_table(
        &garbage_cert,
        &bad_base64.display().to_string(),
        &garbage_key,
    );
    let path = write_config(dir.path(), &bad, CAMERA);
    let ps = check(&path);
    assert_one(&ps, "mqtt.tls.ca_file", "not a usable CA certificate");
    assert_one(&ps, "mqtt.tls.client_cert_file", "not valid PEM");
    assert_one(&ps, "mqtt.tls.client_key_file", "not a usable private key");

    let bad = tls_table(&bad_base64, &garbage_cert.display().to_string(), &two_keys);
    let path = write_config(dir.path(), &bad, CAMERA);
    let ps = check(&path);
    assert_one(&ps, "mqtt.tls.ca_file", "not valid PEM");
    assert_one(
        &ps,
        "mqtt.tls.client_cert_file",
        "not a valid X.509 certificate",
    );
    assert_one(&ps, "mqtt.tls.client_key_file", "2 private keys");

    // A certificate given as the key, and a key given as the CA.
    let bad = tls_table(
        Path::new(&tls("client.key")),
        &tls("client.pem"),
        Path::new(&tls("client.pem")),
    );
    let path = write_config(dir.path(), &bad, CAMERA);
    let ps = check(&path);
    assert_one(
        &ps,
        "mqtt.tls.ca_file",
        "does not look like a PEM certificate",
    );
    assert_one(
        &ps,
        "mqtt.tls.client_key_file",
        "does not look like a PEM private key",
    );
}

#[test]
fn a_broker_host_written_as_a_url_or_with_spaces_is_refused() {
    for (host, fragment) in [
        ("mqtt://broker.local", "is a URL"),
        ("tcp://broker.local:1883", "host = \"broker.local\""),
        ("broker.local:1883", "port = 1883"),
        ("broker local", "white space"),
        ("broker;rm", "not a valid host name"),
    ] {
        let text =
            format!("node_id = \"n\"\n[model]\npackage = \"p\"\n[mqtt]\nhost = {host:?}\n{CAMERA}");
        let err = parse_config(&text, "c.toml", FsChecks::Disabled).expect_err(host);
        assert_one(&err.problems, "mqtt.host", fragment);
        assert_eq!(err.problems[0].line, Some(5), "{err}");
    }
}

#[test]
fn a_model_package_whose_hash_does_not_match_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg = dir.path().join("pkg");
    std::fs::create_dir(&pkg).expect("mkdir");
    for f in [
        "manifest.toml",
        "model.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        "text.f32",
    ] {
        std::fs::copy(Path::new(tiny()).join(f), pkg.join(f)).expect("copy");
    }
    // Same size, one byte changed.
    let mut text = std::fs::read(pkg.join("text.f32")).expect("read");
    text[0] ^= 0x01;
    std::fs::write(pkg.join("text.f32"), text).expect("write");
    let state = dir.path().join("state");
    let config = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\n{CAMERA}",
        state.display().to_string(),
        pkg.display().to_string()
    );
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).expect("write");
    let ps = check(&path);
    assert_one(&ps, "model.package", "SHA-256 mismatch");
    assert_eq!(ps[0].line, Some(4), "{ps:#?}");
}

#[test]
fn a_numeric_password_is_not_echoed_in_the_type_error() {
    let text = format!(
        "node_id = \"n\"\n[model]\npackage = \"p\"\n[mqtt]\nhost = \"h\"\nusername = \"u\"\n\
         password = 987654321\n{CAMERA}"
    );
    let err = parse_config(&text, "c.toml", FsChecks::Disabled).expect_err("numeric password");
    let shown = err.to_string();
    assert!(!shown.contains("987654321"), "{shown}");
    assert_one(&err.problems, "mqtt.password", "must be a string");
    assert_eq!(err.problems[0].line, Some(7));
    // Other types too (a float, an array holding the secret).
    for value in ["987654.321", "[\"hunter2\"]", "{ p = \"hunter2\" }"] {
        let text = format!(
            "node_id = \"n\"\n[model]\npackage = \"p\"\n[mqtt]\nhost = \"h\"\nusername = \"u\"\n\
             password = {value}\n{CAMERA}"
        );
        let err = parse_config(&text, "c.toml", FsChecks::Disabled).expect_err(value);
        let shown = err.to_string();
        assert!(
            !shown.contains("987654") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}

#[test]
fn a_password_file_with_a_second_line_is_refused_and_never_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("pw");
    let text = |pw: &Path| {
        format!(
            "node_id = \"n\"\n[model]\npackage = {:?}\n[mqtt]\nhost = \"h\"\nusername = \"u\"\n\
             password_file = {:?}\n{CAMERA}",
            tiny(),
            pw.display().to_string()
        )
    };
    std::fs::write(&pw, "s3cret\nsecond-line-secret\n").expect("write");
    let err = parse_config(&text(&pw), "c.toml", FsChecks::Enabled).expect_err("two lines");
    assert_one(&err.problems, "mqtt.password_file", "more than one line");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(!err.to_string().contains("second-line"), "{err}");

    // CRLF and trailing empty lines are fine: the password is the first line.
    std::fs::write(&pw, "s3cret\r\n\r\n").expect("write");
    let cfg =
        parse_config(&text(&pw), "c.toml", FsChecks::Enabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.mqtt.password.as_ref().map(|s| s.0.as_str()),
        Some("s3cret")
    );
}

#[test]
fn the_check_config_command_exits_2_with_every_problem_and_0_when_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |path: &Path| {
        let mut child = Command::new(BIN)
            .arg("check-config")
            .arg(path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("check-config hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    };
    let path = write_config(dir.path(), "", CAMERA);
    let out = run(&path);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let bad = write_config(
        dir.path(),
        "port = 1883\n",
        "[[camera]]\nname = \"a\"\npipeline = \"nosuchelement\"\n\
         [[camera]]\nname = \"b\"\nuri = \"rtsps://cam/x\"\n",
    );
    let text = std::fs::read_to_string(&bad)
        .expect("read")
        .replace("host = \"localhost\"", "host = \"mqtt://localhost\"");
    std::fs::write(&bad, text).expect("write");
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(":6: mqtt.host: \"mqtt://…\" is a URL")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(": camera[0].pipeline: ") && l.contains("nosuchelement")),
        "{stderr}"
    );
    assert!(!stderr.contains("camera[1]"), "rtsps is accepted: {stderr}");
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}
