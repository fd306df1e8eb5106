//! Small servers and clients that play applications inside pods: byte sinks and
//! sources with SHA-256 digests, an echo, a "who am I" and an HTTP responder.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use ring::digest::{Context as Digest, SHA256};

use crate::lab::LabPod;
use crate::netns::NetNs;

/// What a server does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum App {
    /// Reads to EOF, then answers `<bytes> <sha256 hex>\n`.
    Sink,
    /// Writes `n` pattern bytes, then closes.
    Source(u64),
    /// Echoes everything back.
    Echo,
    /// Writes `<peer ip>:<peer port>\n` and closes.
    WhoAmI,
    /// HTTP/1.1: `hello from <pod>, you are <peer ip>\n`, then `path <path>`,
    /// `body <bytes read>` and the request's `x-forwarded-for` and `x-*`
    /// headers, one per line, to every request.
    Http,
    /// As [`App::Http`], but every answer has this status (a failing
    /// backend: 503 for retries, say).
    Status(u16),
    /// As [`App::Http`], but every other answer (the first, third, ...)
    /// has this status: a backend that fails half its requests.
    Flaky(u16),
    /// HTTP/1.1 that accepts an `Upgrade` (WebSocket's handshake) with 101
    /// and then echoes the raw bytes.
    Upgrade,
    /// HTTP/1.1 that reads a request and answers after this many milliseconds.
    SlowHttp(u64),
}

/// A server running in a pod; stops when dropped.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    /// [`App::Http`] and [`App::Status`]: the body of each answer so far,
    /// which says what the request was.
    pub answered: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// The bodies answered so far.
    pub fn answers(&self) -> Vec<String> {
        self.answered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Starts `app` on `port` inside `pod`.
pub fn serve(pod: &LabPod, port: u16, app: App) -> Result<Server> {
    serve_in(&pod.netns, &pod.name, port, app)
}

/// Starts `app` on `port` in any namespace of the lab (a node's, say); `name`
/// is what [`App::Http`] says it is.
pub fn serve_in(netns: &NetNs, name: &str, port: u16, app: App) -> Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, a, name) = (stop.clone(), accepted.clone(), name.to_string());
    let log = answered.clone();
    netns.spawn(move || {
        let listener = TcpListener::bind(("0.0.0.0", port));
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return Ok(());
            }
        };
        // Blocking accept after poll(2): immediate when a client arrives, and
        // the stop flag is seen within POLL_MS (a sleep loop would add its
        // period to every connection's latency).
        const POLL_MS: u16 = 50;
        // The connections open now, so that a stopped server also ends the
        // kept-alive ones a proxy would otherwise go on using.
        let open: Arc<Mutex<std::collections::HashMap<u64, TcpStream>>> = Arc::default();
        let mut next = 0u64;
        while !s.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(POLL_MS)) {
                Ok(n) if n > 0 => {}
                _ => continue,
            }
            if let Ok((conn, peer)) = listener.accept() {
                a.fetch_add(1, Ordering::AcqRel);
                let name = name.clone();
                let log = log.clone();
                let id = next;
                next += 1;
                if let Ok(c) = conn.try_clone() {
                    open.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(id, c);
                }
                let open = open.clone();
                thread::spawn(move || {
                    let _ = handle(conn, peer, app, &name, &log);
                    open.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&id);
                });
            }
        }
        for c in open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    })?;
    rx.recv()?
        .with_context(|| format!("binding port {port} in {}", netns.name()))?;
    Ok(Server {
        stop,
        accepted,
        answered,
    })
}

/// What a run of [`churn`] came to.
#[derive(Debug, Default)]
pub struct Churn {
    pub ok: u64,
    /// Each failed connection: what went wrong.
    pub failed: Vec<String>,
}

/// From inside `pod`, opens a connection to an [`App::Echo`] at `dst`, makes
/// one round trip and closes it, `rate` times a second for `time`.
pub fn churn(pod: &LabPod, dst: SocketAddr, rate: u32, time: Duration) -> Result<Churn> {
    let every = Duration::from_secs(1) / rate.max(1);
    pod.netns.run(move || {
        let mut out = Churn::default();
        let start = std::time::Instant::now();
        let mut next = start;
        while start.elapsed() < time {
            let once = || -> io::Result<()> {
                let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.write_all(b"ping")?;
                let mut b = [0u8; 4];
                c.read_exact(&mut b)?;
                if &b != b"ping" {
                    return Err(io::Error::other(format!("echo returned {b:?}")));
                }
                Ok(())
            };
            match once() {
                Ok(()) => out.ok += 1,
                Err(e) => out.failed.push(format!("{:?}: {e}", start.elapsed())),
            }
            next += every;
            if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                thread::sleep(wait);
            }
        }
        Ok(out)
    })
}

/// From inside `pod`, uploads pattern bytes to an [`App::Sink`] at `dst` at
/// about `bytes_per_sec` for `time`, then checks the count and SHA-256 the
/// sink saw against what was sent. Returns the bytes sent.
pub fn paced_upload(
    pod: &LabPod,
    dst: SocketAddr,
    bytes_per_sec: u64,
    time: Duration,
) -> Result<u64> {
    const CHUNK: usize = 64 * 1024;
    client(pod, dst, move |mut conn| {
        let mut digest = Digest::new(&SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < time {
            fill_pattern(&mut buf, &mut state);
            conn.write_all(&buf)?;
            digest.update(&buf);
            sent += CHUNK as u64;
            let due = Duration::from_secs_f64(sent as f64 / bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        let want = format!("{sent} {}", hex(digest.finish().as_ref()));
        anyhow::ensure!(
            reply.trim() == want,
            "sink saw {:?}, sent {want:?}",
            reply.trim()
        );
        Ok(sent)
    })
}

/// Echoes on `port` of the current network namespace until killed: one
/// thread and tokio tasks, for benches that hold thousands of connections
/// (run in a process of its own, so its sockets do not count against the
/// client's file limit).
pub fn echo_forever(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding port {port}"))?;
        loop {
            if let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        }
    })
}

fn handle(
    mut conn: TcpStream,
    peer: SocketAddr,
    app: App,
    pod: &str,
    answered: &Mutex<Vec<String>>,
) -> io::Result<()> {
    match app {
        App::Sink => {
            let (n, digest) = drain(&mut conn)?;
            writeln!(conn, "{n} {digest}")?;
        }
        App::Source(n) => {
            send_pattern(&mut conn, n)?;
        }
        App::Echo => {
            let mut r = conn.try_clone()?;
            io::copy(&mut r, &mut conn)?;
        }
        App::WhoAmI => {
            writeln!(conn, "{peer}")?;
        }
        App::SlowHttp(ms) => {
            let mut reader = BufReader::new(conn.try_clone()?);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                    break;
                }
            }
            thread::sleep(Duration::from_millis(ms));
            write!(conn, "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslow\n")?;
        }
        App::Upgrade => {
            let mut reader = BufReader::new(conn.try_clone()?);
            let mut upgrade = false;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                    break;
                }
                upgrade |= h.to_ascii_lowercase().starts_with("upgrade:");
            }
            if !upgrade {
                write!(
                    conn,
                    "HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n"
                )?;
                return Ok(());
            }
            write!(
                conn,
                "HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n"
            )?;
            // Whatever the reader buffered past the head, then the rest.
            let buffered = reader.buffer().to_vec();
            conn.write_all(&buffered)?;
            let mut r = reader.into_inner();
            io::copy(&mut r, &mut conn)?;
        }
        App::Http | App::Status(_) | App::Flaky(_) => {
            let mut reader = BufReader::new(conn.try_clone()?);
            loop {
                let mut line = String::new();
                let mut keep_alive = true;
                if reader.read_line(&mut line)? == 0 {
                    break;
                }
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let mut echoed = String::new();
                let mut length = 0usize;
                let mut chunked = false;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if lower.starts_with("connection: close") {
                        keep_alive = false;
                    }
                    if lower.starts_with("x-") || lower.starts_with("host:") {
                        echoed.push_str(h.trim_end());
                        echoed.push('\n');
                    }
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                        chunked = true;
                    }
                }
                // The request body, if any, is read, counted and dropped.
                let mut read = 0u64;
                if chunked {
                    loop {
                        let mut size = String::new();
                        reader.read_line(&mut size)?;
                        let n =
                            usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        if n == 0 {
                            // Trailers, up to the empty line.
                            loop {
                                let mut t = String::new();
                                if reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                                    break;
                                }
                            }
                            break;
                        }
                        read += io::copy(&mut (&mut reader).take(n as u64), &mut io::sink())?;
                        io::copy(&mut (&mut reader).take(2), &mut io::sink())?;
                    }
                } else {
                    read = io::copy(&mut (&mut reader).take(length as u64), &mut io::sink())?;
                }
                let body = format!(
                    "hello from {pod}, you are {}\npath {path}\nbody {read}\n{echoed}",
                    peer.ip()
                );
                // Counted and logged under one lock: concurrent requests to
                // a Flaky server still alternate.
                let answered_so_far = {
                    let mut log = answered
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    log.push(body.clone());
                    log.len() - 1
                };
                let (code, reason) = match app {
                    App::Status(c) => (c, "Status"),
                    App::Flaky(c) if answered_so_far.is_multiple_of(2) => (c, "Status"),
                    _ => (200, "OK"),
                };
                write!(
                    conn,
                    "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                if !keep_alive {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift64), so both ends can agree.
pub fn fill_pattern(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Writes `n` pattern bytes and half-closes; returns the digest of what was sent.
pub fn send_pattern(conn: &mut TcpStream, n: u64) -> io::Result<String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut digest = Digest::new(&SHA256);
    let mut left = n;
    while left > 0 {
        let len = left.min(buf.len() as u64) as usize;
        fill_pattern(&mut buf[..len], &mut state);
        digest.update(&buf[..len]);
        conn.write_all(&buf[..len])?;
        left -= len as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(hex(digest.finish().as_ref()))
}

/// Reads to EOF; returns (bytes, sha256 hex).
pub fn drain(conn: &mut impl Read) -> io::Result<(u64, String)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut digest = Digest::new(&SHA256);
    let mut n = 0u64;
    loop {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            break;
        }
        digest.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex(digest.finish().as_ref())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Connects from inside `pod` to `dst`, runs `f` on the stream, returns its result.
pub fn client<T, F>(pod: &LabPod, dst: SocketAddr, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(TcpStream) -> Result<T> + Send + 'static,
{
    pod.netns.run(move || {
        let conn = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
            .with_context(|| format!("connecting to {dst}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        f(conn)
    })
}

/// Uploads `n` pattern bytes to a [`App::Sink`] at `dst`; checks its digest.
pub fn upload(pod: &LabPod, dst: SocketAddr, n: u64) -> Result<()> {
    client(pod, dst, move |mut conn| {
        let sent = send_pattern(&mut conn, n)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        let want = format!("{n} {sent}");
        anyhow::ensure!(
            reply.trim() == want,
            "sink saw {:?}, sent {want:?}",
            reply.trim()
        );
        Ok(())
    })
}

/// Downloads from an [`App::Source`] of `n` bytes at `dst`; checks the digest.
pub fn download(pod: &LabPod, dst: SocketAddr, n: u64) -> Result<()> {
    client(pod, dst, move |mut conn| {
        let (got, digest) = drain(&mut conn)?;
        let mut expect = Digest::new(&SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut left = n;
        while left > 0 {
            let len = left.min(buf.len() as u64) as usize;
            fill_pattern(&mut buf[..len], &mut state);
            expect.update(&buf[..len]);
            left -= len as u64;
        }
        anyhow::ensure!(got == n, "received {got} bytes, want {n}");
        anyhow::ensure!(digest == hex(expect.finish().as_ref()), "digest mismatch");
        Ok(())
    })
}

/// Sends `message` to an [`App::Echo`] at `dst`, half-closes, and checks
/// that the same bytes come back.
pub fn echo_once(pod: &LabPod, dst: SocketAddr, message: &str) -> Result<()> {
    let sent = message.to_string();
    let echoed = client(pod, dst, move |mut conn| {
        conn.write_all(sent.as_bytes())?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut s = String::new();
        conn.read_to_string(&mut s)?;
        Ok(s)
    })?;
    anyhow::ensure!(echoed == message, "echo returned {echoed:?}");
    Ok(())
}

/// What a [`App::WhoAmI`] at `dst` says our address is.
pub fn whoami(pod: &LabPod, dst: SocketAddr) -> Result<SocketAddr> {
    client(pod, dst, |mut conn| {
        let mut s = String::new();
        conn.read_to_string(&mut s)?;
        Ok(s.trim().parse()?)
    })
}

/// An HTTP/1.1 response as a client saw it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request from inside `pod` to `dst` (`Connection:
/// close`; `extra` header lines) and reads the whole response.
pub fn http(
    pod: &LabPod,
    dst: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Result<HttpResponse> {
    http_with_body(pod, dst, method, path, extra, b"")
}

/// As [`http`], with a request body (its `content-length` set).
pub fn http_with_body(
    pod: &LabPod,
    dst: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {dst}\r\nconnection: close\r\n");
    for (k, v) in extra {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    client(pod, dst, move |mut conn| {
        conn.write_all(&request)?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw)?;
        parse_response(&String::from_utf8_lossy(&raw))
    })
}

fn parse_response(text: &str) -> Result<HttpResponse> {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {text:.120?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {text:.120?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// What an HTTP/2 test server does with a request: its path and whole body
/// in, the response body and trailers out. An empty body with trailers is
/// answered trailers-only (the trailers as the response's headers, ending
/// the stream), as gRPC answers an error.
pub type H2Handler = Arc<dyn Fn(&str, bytes::Bytes) -> (Vec<u8>, http::HeaderMap) + Send + Sync>;

/// An HTTP/2 (h2c, prior knowledge) server in `pod` on `port`, as a gRPC
/// service answers: the request body echoed back after a line
/// `hello from <pod> over HTTP/2, path <path>`, then trailers
/// `grpc-status: 0` and `x-echoed-bytes: <n>`. Stops when the returned
/// sender is dropped.
pub fn serve_h2(pod: &LabPod, port: u16) -> Result<tokio::sync::oneshot::Sender<()>> {
    let name = pod.name.clone();
    serve_h2_with(
        pod,
        port,
        Arc::new(move |path, body| {
            let n = body.len();
            let mut out = format!("hello from {name} over HTTP/2, path {path}\n").into_bytes();
            out.extend_from_slice(&body);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            if let Ok(v) = http::HeaderValue::from_str(&n.to_string()) {
                trailers.insert("x-echoed-bytes", v);
            }
            (out, trailers)
        }),
    )
}

/// An HTTP/2 (h2c, prior knowledge) server in `pod` on `port` that answers
/// each request with `handler`. Stops when the returned sender is dropped.
pub fn serve_h2_with(
    pod: &LabPod,
    port: u16,
    handler: H2Handler,
) -> Result<tokio::sync::oneshot::Sender<()>> {
    use http_body_util::BodyExt;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    pod.netns.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let serve = async {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let handler = handler.clone();
                                async move {
                                    let path = req.uri().path().to_string();
                                    let body = req
                                        .into_body()
                                        .collect()
                                        .await
                                        .map(|b| b.to_bytes())
                                        .unwrap_or_default();
                                    let (out, trailers) = handler(&path, body);
                                    if out.is_empty() && !trailers.is_empty() {
                                        let mut resp = hyper::Response::new(
                                            http_body_util::Full::new(bytes::Bytes::new())
                                                .with_trailers(async { None })
                                                .boxed(),
                                        );
                                        *resp.headers_mut() = trailers;
                                        return Ok::<_, std::convert::Infallible>(resp);
                                    }
                                    let body = http_body_util::Full::new(bytes::Bytes::from(out))
                                        .with_trailers(async move { Some(Ok(trailers)) })
                                        .boxed();
                                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                        .await;
                    });
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stop_rx => {}
            }
            Ok(())
        })
    })?;
    ready_rx
        .recv()?
        .with_context(|| format!("binding h2 port {port}"))?;
    Ok(stop_tx)
}

/// An HTTP/2 response as a client saw it, trailers included.
#[derive(Debug, Clone)]
pub struct H2Response {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
    pub trailers: http::HeaderMap,
}

impl H2Response {
    /// The gRPC status: the trailers', or a trailers-only answer's.
    pub fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .get("grpc-status")
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends one HTTP/2 (prior knowledge) POST of `body` from inside `pod` to
/// `dst`, streamed in `chunks` pieces, and reads the whole response.
pub fn h2_post(
    pod: &LabPod,
    dst: SocketAddr,
    path: &str,
    body: Vec<u8>,
    chunks: usize,
) -> Result<H2Response> {
    use http_body_util::{BodyExt, StreamBody};
    let uri: http::Uri = format!("http://{dst}{path}").parse()?;
    pod.netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(dst).await?;
            let (mut send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await?;
            tokio::spawn(conn);
            // The body goes out in pieces, as a client stream does.
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
            >(4);
            let size = body.len().div_ceil(chunks.max(1)).max(1);
            let pieces: Vec<bytes::Bytes> = body
                .chunks(size)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            tokio::spawn(async move {
                for p in pieces {
                    if tx.send(Ok(hyper::body::Frame::data(p))).await.is_err() {
                        break;
                    }
                }
            });
            let stream = ReceiverStream(rx);
            let req = http::Request::post(uri)
                .header("content-type", "application/grpc")
                .body(StreamBody::new(stream))?;
            let resp =
                tokio::time::timeout(Duration::from_secs(20), send.send_request(req)).await??;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let collected = resp.into_body().collect().await?;
            let trailers = collected.trailers().cloned().unwrap_or_default();
            Ok(H2Response {
                status,
                headers,
                body: collected.to_bytes().to_vec(),
                trailers,
            })
        })
    })
}

/// An mpsc receiver as the `Stream` a `StreamBody` reads.
struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// Opens an HTTP/1.1 upgrade (WebSocket's handshake) from `pod` to `dst`,
/// then sends `payload` on the upgraded connection and returns what came
/// back, with the response status line.
pub fn upgrade_echo(pod: &LabPod, dst: SocketAddr, payload: &[u8]) -> Result<(String, Vec<u8>)> {
    let payload = payload.to_vec();
    client(pod, dst, move |mut conn| {
        write!(
            conn,
            "GET /ws HTTP/1.1\r\nhost: {dst}\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                break;
            }
        }
        conn.write_all(&payload)?;
        let mut got = vec![0u8; payload.len()];
        reader.read_exact(&mut got)?;
        Ok((status.trim().to_string(), got))
    })
}

/// A small HTTP/1.1 and HTTP/2 (h2c) server, forever: `hello from <name>\n`
/// to every request, keep-alive. For benches, in a process of its own so
/// its CPU is counted apart.
pub fn http_backend_forever(port: u16, name: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = bytes::Bytes::from(format!("hello from {name}\n"));
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("binding port {port}"))?;
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 3];
                let h2 = conn
                    .peek(&mut first)
                    .await
                    .is_ok_and(|n| n == 3 && &first == b"PRI");
                let service = hyper::service::service_fn(
                    move |_req: hyper::Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(body),
                            ))
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(conn);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
        }
    })
}
