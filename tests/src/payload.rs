//! Loopback endpoints with a known payload, for measuring what a pod sends and receives:
//! [`PayloadServer`] answers every HTTP GET with exactly N body bytes (for
//! `busybox wget -O /dev/null`), [`TcpSink`] counts what it receives until the peer closes
//! (for `... | busybox nc HOST PORT`, which half-closes at the end of its input).
//!
//! Both run on threads of the test process, stop by themselves after a lifetime given at start
//! (so a forgotten one cannot hang a test run) and stop when they drop.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{JoinHandle, sleep},
    time::{Duration, Instant},
};

/// How long a single blocked read or write may take before its thread checks whether to stop.
const IO_TICK: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 * 1024;

struct Shared {
    stop: AtomicBool,
    deadline: Instant,
    /// Payload bytes written (server) or read (sink).
    bytes: AtomicU64,
    /// Exchanges that ran to the end: a full body sent, or a connection read to EOF.
    completed: AtomicU64,
}

impl Shared {
    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }
}

/// An accept loop on its own thread; each connection handled on a thread of its own.
struct Endpoint {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Endpoint {
    fn start(
        lifetime: Duration,
        handle: impl Fn(TcpStream, &Shared) + Send + Sync + 'static,
    ) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            deadline: Instant::now() + lifetime,
            bytes: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        });
        let handle = Arc::new(handle);
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !s.over() {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (s, handle) = (s.clone(), handle.clone());
                        conns.push(std::thread::spawn(move || {
                            if stream.set_nonblocking(false).is_ok()
                                && stream.set_read_timeout(Some(IO_TICK)).is_ok()
                                && stream.set_write_timeout(Some(IO_TICK)).is_ok()
                            {
                                handle(stream, &s);
                            }
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => sleep(Duration::from_millis(10)),
                    Err(_) => sleep(Duration::from_millis(10)),
                }
            }
            // Every connection thread ends within one IO_TICK of `over()`.
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(Endpoint {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    fn wait(&self, what: impl Fn(&Shared) -> bool, timeout: Duration) -> bool {
        let start = Instant::now();
        while !what(&self.shared) {
            if start.elapsed() > timeout || self.shared.over() {
                return what(&self.shared);
            }
            sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Reads with the tick timeout, retrying until data, EOF, an error or the end of the lifetime.
fn read_some(stream: &mut TcpStream, buf: &mut [u8], s: &Shared) -> Option<usize> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Some(n),
            Err(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) && !s.over() => {
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Writes all of `buf`, retrying on the tick timeout until the end of the lifetime; counts
/// written bytes into `counted` when given.
fn write_all(stream: &mut TcpStream, mut buf: &[u8], s: &Shared, counted: bool) -> bool {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => return false,
            Ok(n) => {
                if counted {
                    s.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                buf = &buf[n..];
            }
            Err(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) && !s.over() => {
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// An HTTP/1.x server on 127.0.0.1 that answers every GET with `size` body bytes (zeros) and
/// closes the connection.
pub struct PayloadServer {
    endpoint: Endpoint,
    size: u64,
}

impl PayloadServer {
    /// Serves for at most `lifetime`.
    pub fn start(size: u64, lifetime: Duration) -> std::io::Result<PayloadServer> {
        let endpoint = Endpoint::start(lifetime, move |mut stream, s| {
            // The request head: up to the blank line (16 KiB at most).
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match read_some(&mut stream, &mut buf, s) {
                    Some(n) if n > 0 && head.len() < 16 * 1024 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let get = head.starts_with(b"GET ");
            let (status, len) = if get {
                ("200 OK", size)
            } else {
                ("405 Method Not Allowed", 0)
            };
            let header = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {len}\r\nConnection: close\r\n\r\n"
            );
            if !write_all(&mut stream, header.as_bytes(), s, false) {
                return;
            }
            let zeros = vec![0u8; CHUNK];
            let mut left = len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                if !write_all(&mut stream, &zeros[..n], s, true) {
                    return;
                }
                left -= n as u64;
            }
            if get {
                s.completed.fetch_add(1, Ordering::Relaxed);
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Drain what the client may still send, so closing does not reset the connection.
            while matches!(read_some(&mut stream, &mut buf, s), Some(n) if n > 0) {}
        })?;
        Ok(PayloadServer { endpoint, size })
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// `http://127.0.0.1:PORT/payload`
    pub fn url(&self) -> String {
        format!("http://{}/payload", self.endpoint.addr)
    }

    /// The body size of every answer.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Body bytes written so far, over all requests.
    pub fn body_bytes_sent(&self) -> u64 {
        self.endpoint.shared.bytes.load(Ordering::Relaxed)
    }

    /// GETs answered with the whole body.
    pub fn completed(&self) -> u64 {
        self.endpoint.shared.completed.load(Ordering::Relaxed)
    }

    /// Waits until `n` GETs were answered with the whole body; false on timeout.
    pub fn wait_completed(&self, n: u64, timeout: Duration) -> bool {
        self.endpoint
            .wait(|s| s.completed.load(Ordering::Relaxed) >= n, timeout)
    }
}

/// A TCP server on 127.0.0.1 that reads every connection to its end, counts the bytes and
/// closes it.
pub struct TcpSink {
    endpoint: Endpoint,
}

impl TcpSink {
    /// Listens for at most `lifetime`.
    pub fn start(lifetime: Duration) -> std::io::Result<TcpSink> {
        let endpoint = Endpoint::start(lifetime, |mut stream, s| {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match read_some(&mut stream, &mut buf, s) {
                    Some(0) => {
                        s.completed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Some(n) => {
                        s.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    None => return,
                }
            }
        })?;
        Ok(TcpSink { endpoint })
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// Bytes received so far, over all connections.
    pub fn received(&self) -> u64 {
        self.endpoint.shared.bytes.load(Ordering::Relaxed)
    }

    /// Connections read to their end (the peer closed its side).
    pub fn completed(&self) -> u64 {
        self.endpoint.shared.completed.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections were read to their end; false on timeout.
    pub fn wait_completed(&self, n: u64, timeout: Duration) -> bool {
        self.endpoint
            .wait(|s| s.completed.load(Ordering::Relaxed) >= n, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_sends_exactly_its_size_and_the_sink_counts_what_arrives() {
        let server = PayloadServer::start(1_000_003, Duration::from_secs(30)).unwrap();
        let mut c = TcpStream::connect(server.addr()).unwrap();
        c.write_all(b"GET /payload HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let text = String::from_utf8_lossy(&got[..200]).to_string();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        let body = got.len() - (text.find("\r\n\r\n").unwrap() + 4);
        assert_eq!(body, 1_000_003);
        assert!(server.wait_completed(1, Duration::from_secs(5)));
        assert_eq!(server.body_bytes_sent(), 1_000_003);

        let sink = TcpSink::start(Duration::from_secs(30)).unwrap();
        for n in [300_000usize, 7] {
            let mut c = TcpStream::connect(sink.addr()).unwrap();
            c.write_all(&vec![1u8; n]).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            // The sink closes once it has read everything.
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
        }
        assert!(sink.wait_completed(2, Duration::from_secs(5)));
        assert_eq!(sink.received(), 300_007);
    }

    #[test]
    fn both_stop_at_the_end_of_their_lifetime_and_on_drop() {
        let server = PayloadServer::start(10, Duration::from_millis(300)).unwrap();
        let addr = server.addr();
        // A client that connects and never sends a request does not keep it alive.
        let _idle = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        assert!(!server.wait_completed(1, Duration::from_secs(5)));
        drop(server);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let sink = TcpSink::start(Duration::from_secs(600)).unwrap();
        let _open = TcpStream::connect(sink.addr()).unwrap();
        let t = Instant::now();
        drop(sink);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
}
