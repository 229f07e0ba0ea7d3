//! The state directory is one daemon's alone: the real binary, twice on one config.
//!
//! Two `anomalyclip-edge run` on one state directory would append to one alarm queue and take
//! the MQTT client id from each other; the second must exit 2 at start, naming the first one's
//! pid and the lock file, and leave the first one running.

use crate::common;

use common::broker::free_port;
use common::daemon::{Daemon, config, sim_camera};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_one_state_dir_exits_2_naming_the_first_ones_pid() {
    let state = tempfile::tempdir().expect("state dir");
    // No broker: start-up does not need one.
    let text = config("lk", free_port(), &sim_camera("sim", 0.5)).replace(
        "state_dir = \"state\"",
        &format!("state_dir = \"{}\"", state.path().display()),
    );
    let mut first = Daemon::start(&text);
    first.wait_ready().await;

    let mut second = Daemon::start(&text);
    let status = second.wait_exit().await;
    let log = second.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!("pid {}", first.pid())),
        "the error names the holder's pid {}:\n{log}",
        first.pid()
    );
    let lock = state.path().join("lock");
    assert!(log.contains(&lock.display().to_string()), "{log}");
    assert!(
        !log.contains("mqtt publisher started"),
        "the second daemon stopped before touching the queue or the broker:\n{log}"
    );

    // The first one is undisturbed and still holds the lock.
    first.assert_running();
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock file").trim(),
        first.pid().to_string()
    );
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit().await.code(), Some(0), "{}", first.log());
}
