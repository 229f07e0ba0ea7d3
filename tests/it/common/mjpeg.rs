//! A simulated MJPEG HTTP camera: `multipart/x-mixed-replace` JPEG frames on 127.0.0.1.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Serves one client at a time until stopped; each frame is a solid colour JPEG.
pub struct MjpegCamera {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn jpeg(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let pixels: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(&pixels, width, height, image::ExtendedColorType::Rgb8)
        .expect("encode jpeg");
    out
}

fn serve_client(mut stream: TcpStream, frame: &[u8], fps: u32, stop: &AtomicBool) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    // Read (and ignore) the request head.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4096];
    let _ = std::io::Read::read(&mut stream, &mut buf);
    let head = "HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\
                Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        let part = format!(
            "--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
            frame.len()
        );
        let ok = stream.write_all(part.as_bytes()).is_ok()
            && stream.write_all(frame).is_ok()
            && stream.write_all(b"\r\n").is_ok();
        if !ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(u64::from(1000 / fps.max(1))));
    }
}

impl MjpegCamera {
    /// Serves `width`×`height` frames of colour `rgb` at `fps` on a free port.
    pub fn start(width: u32, height: u32, rgb: [u8; 3], fps: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let frame = jpeg(width, height, rgb);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = stream.set_nonblocking(false);
                            serve_client(stream, &frame, fps, &stop);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>/video.mjpg`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/video.mjpg", self.port)
    }

    /// Stops serving and closes the connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MjpegCamera {
    fn drop(&mut self) {
        self.stop();
    }
}
