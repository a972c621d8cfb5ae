//! A registry mirror that has nothing: a small HTTP/1.1 server on a free loopback port that
//! records every request (method, path, query, whether it carried an `Authorization` header,
//! never its value) and answers each with one fixed [`Answer`].
//!
//! It stands where ragent's peer server will stand in containerd's hosts.toml, to see what
//! containerd asks a mirror and what it does with the answer. It runs on its own thread and
//! runtime and stops on drop.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::oneshot};

/// What the stub answers to every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 404 with an OCI error body: "not here".
    NotFound,
    /// 401 with `WWW-Authenticate: Basic realm="ragent-stub"` to requests without an
    /// Authorization header, 404 to those with one.
    Challenge,
}

/// One request the stub saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Whether an `Authorization` header came (the value is never kept).
    pub authorized: bool,
}

/// A running stub; stops when dropped.
pub struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Stub {
    pub fn start(answer: Answer) -> Result<Stub> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("the stub's runtime")?;
        let log = seen.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mirror-stub-{}", addr.port()))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, log, answer) => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .context("the stub's thread")?;
        Ok(Stub {
            addr,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>`: the URL for hosts.toml.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, seen: Arc<Mutex<Vec<Seen>>>, answer: Answer) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let log = seen.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, log.clone(), answer));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = req.headers().contains_key(header::AUTHORIZATION);
    if let Ok(mut v) = seen.lock() {
        v.push(Seen {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            authorized,
        });
    }
    let challenge = answer == Answer::Challenge && !authorized;
    let (status, body) = if challenge {
        (
            401,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}"#,
        )
    } else {
        (
            404,
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"not here"}]}"#,
        )
    };
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    if challenge {
        r = r.header(header::WWW_AUTHENTICATE, "Basic realm=\"ragent-stub\"");
    }
    Ok(r.body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}
