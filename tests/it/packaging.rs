//! Packaging checks: the systemd unit passes `systemd-analyze verify` (and broken copies of it
//! do not), the maintainer scripts parse, and the Debian package installs exactly what
//! `docs/install.md` says it installs, with an example config that the installed binary's
//! `check-config` accepts and an ONNX Runtime library where the daemon looks for it.
//!
//! The `.deb` is built beforehand by `scripts/build-deb` (CI: `--profile dev --no-build`, the
//! binary `cargo test` built). The test takes `$ANOMALYCLIP_DEB`, else the newest
//! `target/debian/anomalyclip-edge_*.deb`. Without one (or without `dpkg-deb` or
//! `systemd-analyze`, or with a `.deb` older than the unit or config in the tree) the test says
//! is ignored or fails with the reason; it never passes without checking.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the unit expects the binary; rewritten to a real binary for `verify`.
const INSTALLED_BIN: &str = "/usr/bin/anomalyclip-edge";
const UNIT_NAME: &str = "anomalyclip-edge.service";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn required() -> bool {
    std::env::var("ANOMALYCLIP_REQUIRE_DEB").is_ok_and(|v| v == "1")
}

/// A check that cannot be made here fails with the reason: a test whose dependency is missing
/// is marked ignored when it is compiled (`build.rs`), so reaching this means the machine lost
/// the dependency since, or the test was asked for with `--include-ignored` (CI).
fn skip(reason: &str) {
    panic!("{reason} (ANOMALYCLIP_REQUIRE_DEB={})", required());
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The unit
// ---------------------------------------------------------------------------------------------

/// `systemd-analyze verify` on a copy of `unit`, named like the real unit, with the installed
/// binary's path replaced by `bin` (verify insists that every `Exec*=` program exists; the rest
/// of the unit is checked as written). Passing means exit 0 *and* no diagnostic about this unit:
/// verify exits 0 after "Unknown key …, ignoring" and bad values, which are real mistakes.
/// Lines about other units (the host's targets) do not count.
fn verify(unit: &str, bin: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(UNIT_NAME);
    std::fs::write(
        &path,
        unit.replace(INSTALLED_BIN, &bin.display().to_string()),
    )
    .expect("write unit copy");
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0"));
    let all = text(&out);
    let ours: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("anomalyclip-edge"))
        .collect();
    if out.status.success() && ours.is_empty() {
        Ok(())
    } else {
        Err(format!("exit {:?}:\n{all}", out.status.code()))
    }
}

/// `systemd-analyze security --offline` exposure level (0.0 best … 10.0), from its last line.
fn exposure(unit: &str, bin: &Path) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(UNIT_NAME);
    std::fs::write(
        &path,
        unit.replace(INSTALLED_BIN, &bin.display().to_string()),
    )
    .expect("write unit copy");
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0"));
    let all = text(&out);
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    let value = line
        .rsplit(':')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    value
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"))
}

/// The unit as (section, key) → values, in file order; comments and blank lines dropped.
fn parse_unit(unit: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut map: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            map.entry((section.clone(), k.trim().to_string()))
                .or_default()
                .push(v.trim().to_string());
        }
    }
    map
}

#[cfg_attr(
    not(have_systemd_analyze),
    ignore = "needs systemd-analyze (Debian package systemd)"
)]
#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze not installed (Debian: apt-get install systemd)");
    }
    let unit = read("systemd/anomalyclip-edge.service");
    let bin = Path::new(env!("CARGO_BIN_EXE_anomalyclip-edge"));
    if let Err(e) = verify(&unit, bin) {
        panic!("systemd-analyze verify systemd/{UNIT_NAME} failed: {e}");
    }
    // Hardening regression guard: 3.1 when written (lower is better; PrivateDevices=,
    // MemoryDenyWriteExecute= and SystemCallFilter= stay off for the GPU, see the unit).
    let level = exposure(&unit, bin);
    assert!(
        level <= 3.5,
        "systemd-analyze security exposure rose to {level} (was 3.1)"
    );
}

#[cfg_attr(
    not(have_systemd_analyze),
    ignore = "needs systemd-analyze (Debian package systemd)"
)]
#[test]
fn verify_catches_broken_units() {
    if !have("systemd-analyze") {
        return skip("systemd-analyze not installed (Debian: apt-get install systemd)");
    }
    let unit = read("systemd/anomalyclip-edge.service");
    let bin = Path::new(env!("CARGO_BIN_EXE_anomalyclip-edge"));
    let cases: [(&str, &str, &str); 6] = [
        (
            "misspelt key",
            "Restart=on-failure",
            "Restart=on-failure\nRestrat=always",
        ),
        ("bad service type", "Type=notify", "Type=notfy"),
        ("bad time span", "WatchdogSec=30", "WatchdogSec=thirty"),
        (
            "missing program",
            "ExecStartPre=/usr/bin/anomalyclip-edge",
            "ExecStartPre=/nonexistent/anomalyclip-edge",
        ),
        ("misspelt section", "[Service]", "[Servcie]"),
        (
            "bad device rights",
            "DeviceAllow=char-video4linux rw",
            "DeviceAllow=char-video4linux rwx",
        ),
    ];
    for (what, from, to) in cases {
        assert!(unit.contains(from), "{what}: the unit has no {from:?}");
        let broken = unit.replacen(from, to, 1);
        match verify(&broken, bin) {
            Ok(()) => panic!("verify accepted a unit with a {what} ({from:?} -> {to:?})"),
            Err(e) => eprintln!("{what}: rejected as expected: {}", e.trim_end()),
        }
    }
}

#[test]
fn unit_has_what_the_daemon_and_the_issue_need() {
    let unit = parse_unit(&read("systemd/anomalyclip-edge.service"));
    let get = |s: &str, k: &str| -> Vec<String> {
        unit.get(&(s.to_string(), k.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    let one = |s: &str, k: &str| -> String {
        let v = get(s, k);
        assert_eq!(
            v.len(),
            1,
            "[{s}] {k}= should be set exactly once, found {v:?}"
        );
        v[0].clone()
    };
    let conf = "/etc/anomalyclip-edge/config.toml";
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(
        one("Service", "ExecStartPre"),
        format!("{INSTALLED_BIN} check-config {conf}")
    );
    assert_eq!(
        one("Service", "ExecStart"),
        format!("{INSTALLED_BIN} run --config {conf}")
    );
    assert_eq!(
        get("Service", "ExecReload"),
        vec![
            format!("{INSTALLED_BIN} check-config {conf}"),
            "/bin/kill -HUP $MAINPID".to_string()
        ]
    );
    assert!(one("Service", "WatchdogSec").parse::<u32>().unwrap_or(0) > 0);
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert!(
        one("Unit", "StartLimitIntervalSec")
            .parse::<u32>()
            .unwrap_or(0)
            > 0
    );
    assert!(one("Unit", "StartLimitBurst").parse::<u32>().unwrap_or(0) > 0);
    // The user the Debian package creates.
    assert_eq!(one("Service", "User"), "anomalyclip-edge");
    assert!(read("debian/postinst").contains("NAME=anomalyclip-edge"));
    // A group missing on the host fails the start (216/GROUP): postinst adds the user to the
    // groups that exist instead.
    assert!(get("Service", "SupplementaryGroups").is_empty());
    for k in ["StateDirectory", "CacheDirectory", "ConfigurationDirectory"] {
        assert_eq!(one("Service", k), "anomalyclip-edge", "{k}");
    }
    for (k, v) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("DevicePolicy", "closed"),
        ("StandardOutput", "journal"),
        ("StandardError", "journal"),
    ] {
        assert_eq!(one("Service", k), v, "{k}");
    }
    let devices = get("Service", "DeviceAllow").join(" ");
    for d in ["char-nvidia*", "char-video4linux"] {
        assert!(devices.contains(d), "DeviceAllow= lacks {d}: {devices}");
    }
    // Would hide the GPUs and cameras / break the GPU JIT compilers.
    for k in ["PrivateDevices", "MemoryDenyWriteExecute"] {
        assert!(
            get("Service", k).iter().all(|v| v == "no"),
            "{k}= must stay off"
        );
    }
    let families = one("Service", "RestrictAddressFamilies");
    for f in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(
            families.split_whitespace().any(|x| x == f),
            "RestrictAddressFamilies= lacks {f} (GStreamer/RTSP/MQTT/DNS need it)"
        );
    }
}

/// Every `Exec*=` line that runs the daemon uses a subcommand and options the binary has.
#[test]
fn unit_commands_exist_in_the_binary() {
    let unit = parse_unit(&read("systemd/anomalyclip-edge.service"));
    let bin = env!("CARGO_BIN_EXE_anomalyclip-edge");
    let mut checked = 0;
    for ((_, key), values) in &unit {
        for line in values.iter().filter(|_| key.starts_with("Exec")) {
            let mut words = line.split_whitespace();
            if words.next() != Some(INSTALLED_BIN) {
                continue;
            }
            let Some(sub) = words.next() else { continue };
            let help = run(Command::new(bin).args([sub, "--help"]));
            if !help.status.success() {
                skip(&format!(
                    "{key}={line}: the binary has no `{sub}` subcommand yet: {}",
                    text(&help).lines().next().unwrap_or("")
                ));
                continue;
            }
            let help = text(&help);
            for opt in words.filter(|w| w.starts_with("--")) {
                assert!(
                    help.contains(opt),
                    "{key}={line}: `{sub}` has no option {opt}:\n{help}"
                );
            }
            checked += 1;
        }
    }
    eprintln!("{checked} Exec lines match the binary's command line");
}

#[test]
fn maintainer_scripts_parse_and_never_start_the_service() {
    for name in ["postinst", "prerm", "postrm"] {
        let path = repo().join("debian").join(name);
        let script = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(script.starts_with("#!/bin/sh\n"), "{name}: #!/bin/sh");
        assert!(script.contains("\nset -e\n"), "{name}: set -e");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert!(
                mode & 0o111 != 0,
                "{name} must be executable (mode {mode:o})"
            );
        }
        let out = run(Command::new("sh").arg("-n").arg(&path));
        assert!(out.status.success(), "sh -n {name}: {}", text(&out));
        if have("shellcheck") {
            let out = run(Command::new("shellcheck").arg(&path));
            assert!(out.status.success(), "shellcheck {name}:\n{}", text(&out));
        }
    }
    // Plants configure first: installing never enables or starts the daemon.
    let postinst = read("debian/postinst");
    for bad in [
        "systemctl enable",
        "systemctl start",
        "deb-systemd-invoke start",
    ] {
        assert!(!postinst.contains(bad), "postinst must not run {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The .deb
// ---------------------------------------------------------------------------------------------

/// `$ANOMALYCLIP_DEB`, else the newest `target/debian/anomalyclip-edge_*.deb`.
fn find_deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ANOMALYCLIP_DEB").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ANOMALYCLIP_DEB={} is not a file", p.display());
        return Some(p);
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("debian");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("anomalyclip-edge_") && n.ends_with(".deb"))
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// One entry of `dpkg-deb --contents`.
#[derive(Debug)]
struct Entry {
    /// `d`, `-`, `l`, …
    kind: char,
    mode: String,
    owner: String,
    link: Option<String>,
}

/// `dpkg-deb --contents`: absolute path (directories with a trailing `/`) → entry.
fn deb_contents(deb: &Path) -> BTreeMap<String, Entry> {
    let out = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    assert!(out.status.success(), "dpkg-deb --contents: {}", text(&out));
    let mut map = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // drwxr-xr-x 0/0 0 2026-01-01 00:00 ./usr/bin/   |   lrwxrwxrwx … ./a -> b
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 6, "unexpected dpkg-deb line {line:?}");
        let path = f[5].trim_start_matches('.').to_string();
        if path == "/" {
            continue;
        }
        let link = (f.len() == 8 && f[6] == "->").then(|| f[7].to_string());
        map.insert(
            path,
            Entry {
                kind: f[0].chars().next().unwrap_or('?'),
                mode: f[0].to_string(),
                owner: f[1].to_string(),
                link,
            },
        );
    }
    map
}

/// The installed-files table of docs/install.md (between the `installed-files` markers): the
/// first backticked path of each row. A path ending in `/` stands for everything under it.
fn documented_files() -> Vec<String> {
    let doc = read("docs/install.md");
    let start = doc
        .find("<!-- installed-files:begin -->")
        .expect("docs/install.md: <!-- installed-files:begin --> marker");
    let end = doc
        .find("<!-- installed-files:end -->")
        .expect("docs/install.md: <!-- installed-files:end --> marker");
    let rows: Vec<String> = doc[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix('|'))
        .filter_map(|l| l.split('|').next())
        .filter_map(|cell| {
            let cell = cell.trim();
            let inner = cell.strip_prefix('`')?;
            Some(inner[..inner.find('`')?].to_string())
        })
        .filter(|p| p.starts_with('/'))
        .collect();
    assert!(
        rows.len() >= 5,
        "docs/install.md table looks empty: {rows:?}"
    );
    rows
}

/// Rewrites every quoted absolute path of a TOML text that exists under `root` to its copy
/// there (what the config means on the installed system, in the extracted tree). Comments stay.
fn rebase_paths(toml: &str, root: &Path) -> (String, Vec<String>) {
    let mut rebased = Vec::new();
    let mut outl = Vec::new();
    for line in toml.lines() {
        if line.trim_start().starts_with('#') {
            outl.push(line.to_string());
            continue;
        }
        let mut s = String::new();
        let mut parts = line.split('"');
        s.push_str(parts.next().unwrap_or(""));
        for (i, part) in parts.enumerate() {
            s.push('"');
            // Odd pieces (index 0, 2, …) are inside quotes.
            if i % 2 == 0
                && part.starts_with('/')
                && root.join(part.trim_start_matches('/')).exists()
            {
                s.push_str(
                    &root
                        .join(part.trim_start_matches('/'))
                        .display()
                        .to_string(),
                );
                rebased.push(part.to_string());
            } else {
                s.push_str(part);
            }
        }
        outl.push(s);
    }
    (outl.join("\n") + "\n", rebased)
}

#[cfg_attr(
    not(all(have_deb, have_dpkg_deb)),
    ignore = "needs the .deb (scripts/build-deb) and dpkg-deb"
)]
#[test]
fn deb_installs_what_install_md_lists_and_its_config_checks() {
    let Some(deb) = find_deb() else {
        return skip(
            "no .deb: build one with scripts/build-deb (CI: scripts/build-deb --profile dev \
             --no-build --fast) or set ANOMALYCLIP_DEB",
        );
    };
    if !have("dpkg-deb") {
        return skip("dpkg-deb not installed");
    }
    eprintln!("checking {}", deb.display());

    // 1. Extract (control data and files); a package built from another tree (stale: unit,
    //    config, docs or maintainer scripts differ) is not this tree's package.
    let ctrl = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctrl.path()));
    assert!(out.status.success(), "dpkg-deb -e: {}", text(&out));
    let root_dir = tempfile::tempdir().expect("tempdir");
    let root = root_dir.path();
    let out = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root));
    assert!(out.status.success(), "dpkg-deb -x: {}", text(&out));
    let same = |a: &Path, b: &Path| std::fs::read(a).ok() == std::fs::read(b).ok();
    let mut stale: Vec<String> = Vec::new();
    for (src, dst) in [
        (
            "systemd/anomalyclip-edge.service",
            "lib/systemd/system/anomalyclip-edge.service",
        ),
        ("config/example.toml", "etc/anomalyclip-edge/config.toml"),
        (
            "docs/install.md",
            "usr/share/doc/anomalyclip-edge/install.md",
        ),
    ] {
        if !same(&repo().join(src), &root.join(dst)) {
            stale.push(src.to_string());
        }
    }
    for script in ["postinst", "prerm", "postrm"] {
        if !same(
            &repo().join("debian").join(script),
            &ctrl.path().join(script),
        ) {
            stale.push(format!("debian/{script}"));
        }
    }
    if !stale.is_empty() {
        return skip(&format!(
            "{} is stale ({} changed since): rebuild it with scripts/build-deb",
            deb.display(),
            stale.join(", ")
        ));
    }

    // 2. Contents == the documented table (both ways).
    let contents = deb_contents(&deb);
    let listed = documented_files();
    for p in &listed {
        if p.ends_with('/') {
            assert!(
                contents
                    .keys()
                    .any(|c| c.starts_with(p.as_str()) && !c.ends_with('/')),
                "docs/install.md lists {p} but the .deb has no file under it"
            );
        } else {
            assert!(
                contents.contains_key(p),
                "docs/install.md lists {p} but the .deb does not install it"
            );
        }
    }
    for (p, e) in &contents {
        if e.kind == 'd' {
            continue;
        }
        let covered = listed
            .iter()
            .any(|l| l == p || (l.ends_with('/') && p.starts_with(l.as_str())));
        assert!(
            covered,
            "the .deb installs {p}, which docs/install.md's table does not list"
        );
        assert_eq!(e.owner, "0/0", "{p} should be owned by root");
    }
    let lib_link = "/usr/lib/anomalyclip-edge/onnxruntime/libonnxruntime.so";
    let link = contents
        .get(lib_link)
        .unwrap_or_else(|| panic!("{lib_link} missing"));
    assert_eq!(link.kind, 'l', "{lib_link} should be a symlink: {link:?}");
    let target = link.link.clone().expect("link target");
    assert!(
        !target.contains('/')
            && contents.contains_key(&format!("/usr/lib/anomalyclip-edge/onnxruntime/{target}")),
        "{lib_link} -> {target} should name a library next to it"
    );
    assert_eq!(
        anomalyclip_edge::engine::default_library_paths()[0],
        Path::new(lib_link),
        "the daemon's first default ONNX Runtime path is not the one the package installs"
    );
    let conf = &contents["/etc/anomalyclip-edge/config.toml"];
    assert_eq!(
        conf.mode, "-rw-r-----",
        "config.toml may hold a password: 0640"
    );

    // 3. Control data.
    let conffiles = std::fs::read_to_string(ctrl.path().join("conffiles")).unwrap_or_default();
    assert!(
        conffiles
            .lines()
            .any(|l| l == "/etc/anomalyclip-edge/config.toml"),
        "config.toml must be a conffile (upgrades keep local edits): {conffiles:?}"
    );
    let control = std::fs::read_to_string(ctrl.path().join("control")).expect("control");
    let depends = control
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends in\n{control}"));
    for dep in [
        "adduser",
        "libgstreamer1.0-0",
        "gstreamer1.0-plugins-base",
        "gstreamer1.0-plugins-good",
        "gstreamer1.0-plugins-bad",
        "gstreamer1.0-libav",
        "libc6",
    ] {
        assert!(
            depends.split(',').any(|d| d.trim().starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }

    // 4. The installed unit verifies against the installed binary, and everything it names
    //    that the package should provide is there.
    let bin = root.join(INSTALLED_BIN.trim_start_matches('/'));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system").join(UNIT_NAME))
        .expect("installed unit");
    if have("systemd-analyze") {
        if let Err(e) = verify(&unit, &bin) {
            panic!("the installed unit fails systemd-analyze verify: {e}");
        }
    } else {
        skip("systemd-analyze not installed: installed unit not verified");
    }
    let parsed = parse_unit(&unit);
    let mut named: Vec<String> = Vec::new();
    for ((_, k), vs) in &parsed {
        for v in vs {
            if k.starts_with("Exec") {
                named.extend(
                    v.split_whitespace()
                        .filter(|w| {
                            w.starts_with("/usr/") || w.starts_with("/etc/anomalyclip-edge")
                        })
                        .map(str::to_string),
                );
            } else if k == "Documentation" {
                named.extend(
                    v.split_whitespace()
                        .filter_map(|u| u.strip_prefix("file://"))
                        .map(str::to_string),
                );
            }
        }
    }
    assert!(named.len() >= 3, "{named:?}");
    for p in &named {
        assert!(
            contents.contains_key(p),
            "the unit names {p}, which the .deb does not install"
        );
    }

    // 5. The installed example config passes the installed binary's check-config. Its absolute
    //    paths point into the installed system (/usr/share/anomalyclip-edge/models/tiny); they
    //    are rebased onto the extracted tree, the one thing dpkg --root would do that -x does
    //    not (a chroot would need the binary's shared libraries inside it).
    let installed_conf =
        std::fs::read_to_string(root.join("etc/anomalyclip-edge/config.toml")).expect("config");
    let (conf_text, rebased) = rebase_paths(&installed_conf, root);
    assert!(
        rebased
            .iter()
            .any(|p| p.starts_with("/usr/share/anomalyclip-edge/models/")),
        "the installed config's [model] package should be the model package the .deb ships \
         (rebased: {rebased:?})"
    );
    let work = tempfile::tempdir().expect("tempdir");
    // check-config probes (and creates) the state directory as the user running it: point it
    // into the work directory rather than at this machine's /var/lib.
    let state_line = "state_dir = \"/var/lib/anomalyclip-edge\"";
    assert!(conf_text.contains(state_line), "{conf_text}");
    let conf_text = conf_text.replace(
        state_line,
        &format!(
            "state_dir = {:?}",
            work.path().join("state").display().to_string()
        ),
    );
    let conf_path = work.path().join("config.toml");
    std::fs::write(&conf_path, &conf_text).expect("write config");
    let help = run(Command::new(&bin).args(["check-config", "--help"]));
    if !help.status.success() {
        skip(&format!(
            "the packaged binary has no check-config subcommand yet: {}",
            text(&help).lines().next().unwrap_or("")
        ));
    } else {
        let out = run(Command::new(&bin).arg("check-config").arg(&conf_path));
        assert!(
            out.status.success(),
            "installed check-config rejects the installed example config ({rebased:?} \
             rebased onto {}):\n{}",
            root.display(),
            text(&out)
        );
        // …and it does check: a package path that does not exist is exit 2, FILE:LINE: ….
        let broken = conf_text.replace(
            &root
                .join("usr/share/anomalyclip-edge/models")
                .display()
                .to_string(),
            &root.join("nonexistent/models").display().to_string(),
        );
        let bad_path = work.path().join("broken.toml");
        std::fs::write(&bad_path, broken).expect("write");
        let out = run(Command::new(&bin).arg("check-config").arg(&bad_path));
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("{}:", bad_path.display())),
            "check-config should name FILE:LINE:\n{}",
            text(&out)
        );
    }

    // 6. The packaged ONNX Runtime and test model work from the packaged paths: score one image
    //    with no ORT_DYLIB_PATH, so the library is found by the daemon's default search.
    let img = work.path().join("frame.png");
    image::RgbImage::from_fn(96, 64, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, 128])
    })
    .save(&img)
    .expect("write png");
    let model = root.join("usr/share/anomalyclip-edge/models/tiny");
    let out = run(Command::new(&bin)
        .args(["--log", "info", "score", "--model"])
        .arg(&model)
        .arg(&img)
        .env_remove("ORT_DYLIB_PATH"));
    let all = text(&out);
    assert!(out.status.success(), "installed score failed:\n{all}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"score\":"),
        "{all}"
    );
    // Found next to the binary (<root>/usr/bin/../lib/…), or at /usr/lib/… when this host has
    // the package installed.
    let loaded = all
        .lines()
        .find(|l| l.contains("ONNX Runtime loaded"))
        .unwrap_or_else(|| panic!("no 'ONNX Runtime loaded' line:\n{all}"));
    assert!(
        loaded.contains(lib_link)
            || loaded.contains(&format!(
                "{}/usr/bin/../lib/anomalyclip-edge/onnxruntime/libonnxruntime.so",
                root.display()
            )),
        "ONNX Runtime should come from the packaged private path: {loaded}"
    );
}
