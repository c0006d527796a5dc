//! The operations API: `GET /status` (JSON) and `POST /reload`, on 127.0.0.1:9900 by default
//! or a unix socket. Handlers only read (a status snapshot and the pinned maps); changes go to
//! the agent loop as commands, so the agent stays the only writer.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use crate::{
    config::ApiListen,
    datapath::Datapath,
    status::{Applied, Status},
};

/// A change requested through the API, answered by the agent loop.
pub enum Command {
    Reload(oneshot::Sender<Result<String, String>>),
}

#[derive(Clone)]
struct ApiState {
    applied: watch::Receiver<Arc<Applied>>,
    datapath: Arc<Datapath>,
    commands: mpsc::Sender<Command>,
}

/// Binds the API listener and serves it until the process ends.
pub async fn serve(
    listen: &ApiListen,
    pin_path: PathBuf,
    applied: watch::Receiver<Arc<Applied>>,
    commands: mpsc::Sender<Command>,
) -> Result<tokio::task::JoinHandle<()>> {
    let datapath = Arc::new(Datapath::open_pinned(&pin_path)?);
    let router = Router::new()
        .route("/status", get(status))
        .route("/reload", post(reload))
        .with_state(ApiState {
            applied,
            datapath,
            commands,
        });
    let task = match listen {
        ApiListen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the API to {addr}"))?;
            info!(%addr, "API listening");
            tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            })
        }
        ApiListen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the API to {}", path.display()))?;
            info!(path = %path.display(), "API listening");
            tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            })
        }
    };
    Ok(task)
}

async fn status(State(state): State<ApiState>) -> Response {
    let applied = state.applied.borrow().clone();
    match Status::collect(&applied, &state.datapath) {
        Ok(status) => Json(status).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

async fn reload(State(state): State<ApiState>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.commands.send(Command::Reload(tx)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n").into_response();
    }
    match rx.await {
        Ok(Ok(msg)) => (StatusCode::OK, format!("{msg}\n")).into_response(),
        Ok(Err(msg)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{msg}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n").into_response(),
    }
}

/// A minimal client for the CLI: one request, the body as text.
pub async fn request(listen: &ApiListen, method: &str, path: &str) -> Result<(u16, String)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "xlb")
        .body(Empty::<Bytes>::new())?;
    let response = match listen {
        ApiListen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| {
                    format!("connecting to the xlb API at {addr} (is `xlb run` up?)")
                })?;
            send(stream, req).await?
        }
        ApiListen::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| {
                    format!(
                        "connecting to the xlb API at {} (is `xlb run` up?)",
                        path.display()
                    )
                })?;
            send(stream, req).await?
        }
    };
    let code = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

async fn send<S>(
    stream: S,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}
