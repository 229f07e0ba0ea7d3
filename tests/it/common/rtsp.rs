//! A simulated IP camera: an RTSP server on 127.0.0.1 serving a live H.264 test pattern.
//!
//! The server runs its own GLib main loop on its own thread. [`RtspCamera::stop`] really
//! takes the camera away: it removes the mount point, closes every client connection, removes
//! every session (which stops the media pipelines, so no more RTP packets arrive, over UDP
//! either), destroys the listening socket's source and quits the loop; a connection attempt
//! is then refused. [`RtspCamera::restart`] serves again on the same port.

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::prelude::*;
use rtsp::glib;

/// The mount path the camera is served at.
pub const MOUNT: &str = "/cam";

/// The default stream: 320×240 at 15 fps, a keyframe every second.
pub const DEFAULT_LAUNCH: &str = "( videotestsrc is-live=true pattern=ball \
    ! video/x-raw,width=320,height=240,framerate=15/1 ! videoconvert \
    ! openh264enc gop-size=15 ! rtph264pay name=pay0 pt=96 config-interval=-1 )";

struct Running {
    context: glib::MainContext,
    main_loop: glib::MainLoop,
    thread: JoinHandle<()>,
}

/// A running (or stopped) simulated IP camera.
pub struct RtspCamera {
    port: u16,
    launch: String,
    /// One media for every client (a real camera: a client joins the running stream mid-GOP).
    shared: bool,
    running: Option<Running>,
}

impl RtspCamera {
    /// Serves [`DEFAULT_LAUNCH`] on a free port.
    pub fn start() -> Self {
        Self::start_with(DEFAULT_LAUNCH, 0)
    }

    /// Serves `launch` (a media factory launch line, payloader named `pay0`) on `port`
    /// (0: a free one).
    pub fn start_with(launch: &str, port: u16) -> Self {
        let mut cam = Self {
            port,
            launch: launch.to_owned(),
            shared: false,
            running: None,
        };
        cam.serve();
        cam
    }

    /// Serves `launch` like a real IP camera: one media shared by every client and kept
    /// running between clients, so a client joins the stream wherever it is (mid-GOP).
    pub fn start_shared(launch: &str) -> Self {
        let mut cam = Self {
            port: 0,
            launch: launch.to_owned(),
            shared: true,
            running: None,
        };
        cam.serve();
        cam
    }

    fn serve(&mut self) {
        gstreamer::init().expect("gstreamer init");
        let server = rtsp::RTSPServer::new();
        server.set_address("127.0.0.1");
        server.set_service(&self.port.to_string());
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(&self.launch);
        // Default: one pipeline per client, every client starts at a keyframe.
        factory.set_shared(self.shared);
        if self.shared {
            factory.set_suspend_mode(rtsp::RTSPSuspendMode::None);
        }
        server
            .mount_points()
            .expect("server has mount points")
            .add_factory(MOUNT, factory);
        // Binds the listening socket (with SO_REUSEADDR, so a restart can reuse the port).
        let source = server
            .create_source(None::<&rtsp::gio::Cancellable>)
            .expect("RTSP server failed to listen on 127.0.0.1");
        let bound = server.bound_port();
        self.port = u16::try_from(bound).expect("bound port");
        let context = glib::MainContext::new();
        let main_loop = glib::MainLoop::new(Some(&context), false);
        source.attach(Some(&context));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rtsp-server".into())
            .spawn({
                let context = context.clone();
                let main_loop = main_loop.clone();
                move || {
                    // Clients are attached to the thread-default context of the thread that
                    // accepts them: it must be ours.
                    context
                        .with_thread_default(|| {
                            let _ = ready_tx.send(());
                            main_loop.run();
                            // Stop: runs on this thread, where the server's objects live.
                            server
                                .mount_points()
                                .expect("mount points")
                                .remove_factory(MOUNT);
                            server.client_filter(Some(&mut |_, _| rtsp::RTSPFilterResult::Remove));
                            if let Some(pool) = server.session_pool() {
                                pool.filter(Some(&mut |_, _| rtsp::RTSPFilterResult::Remove));
                            }
                            source.destroy();
                            // Let the closes run (they post to this context).
                            for _ in 0..1000 {
                                if !context.iteration(false) {
                                    break;
                                }
                            }
                        })
                        .expect("acquire the server main context");
                }
            })
            .expect("spawn the RTSP server thread");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("RTSP server thread started");
        self.running = Some(Running {
            context,
            main_loop,
            thread,
        });
    }

    /// `rtsp://127.0.0.1:<port>/cam`.
    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}{MOUNT}", self.port)
    }

    /// The TCP port (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server is serving.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Takes the camera away: clients disconnected, sessions removed, socket closed.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let main_loop = running.main_loop.clone();
            running.context.invoke(move || main_loop.quit());
            running.thread.join().expect("RTSP server thread");
        }
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }
}

impl Drop for RtspCamera {
    fn drop(&mut self) {
        self.stop();
    }
}
