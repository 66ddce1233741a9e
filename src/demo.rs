//! `--demo`: small built-in upstreams on the addresses the config names, so the quick
//! start works on a machine with no backend. Each answers with a JSON echo of what it
//! received: which demo upstream it is, the method, path, headers and body size.

use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::Config;

/// Binds every target of every upstream in `config` and serves echo upstreams on a
/// background thread. Fails if an address cannot be bound (e.g. already in use).
pub fn spawn_echo_upstreams(config: &Config) -> io::Result<Vec<SocketAddr>> {
    let mut listeners = Vec::new();
    let mut seen = Vec::new();
    for u in &config.upstreams {
        for target in &u.targets {
            let addr = target.to_socket_addrs()?.next().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {target}"))
            })?;
            if seen.contains(&addr) {
                continue;
            }
            seen.push(addr);
            let l = StdListener::bind(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "--demo cannot listen on {addr} for upstream {:?}: {e}",
                        u.name
                    ),
                )
            })?;
            l.set_nonblocking(true)?;
            listeners.push((l, u.name.clone()));
        }
    }
    let rt = crate::server::runtime()?;
    std::thread::Builder::new()
        .name("bulkhead-demo".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, name) in listeners {
                    tasks.push(tokio::spawn(serve_echo(l, name)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
    Ok(seen)
}

async fn serve_echo(listener: StdListener, name: String) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let Ok(local) = listener.local_addr() else {
        return;
    };
    tracing::info!(upstream = %name, addr = %local, "demo upstream listening");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| echo(req, name.clone(), local));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn echo(
    req: Request<Incoming>,
    upstream: String,
    local: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        headers.insert(
            k.as_str().to_owned(),
            serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    }
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let out = serde_json::json!({
        "upstream": upstream,
        "addr": local.to_string(),
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut text = serde_json::to_vec_pretty(&out).unwrap_or_default();
    text.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
