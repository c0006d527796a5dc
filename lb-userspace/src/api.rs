//! The operations API on 127.0.0.1:9900 by default (or a unix socket): `GET /status` (JSON),
//! `GET /metrics` (Prometheus text), `POST /reload`, and
//! `POST /backends/{service}/{backend}/drain` (or `/undrain`). Handlers only read; changes go
//! to the agent loop as commands, so the agent stays the only writer.
use std::sync::Arc;

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
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
    discovery::supervise::Board,
    flowtables::TableStatus,
    health::HealthReader,
    http,
    metrics::{self, ProbeLatency},
    status::{Applied, Status},
};

pub type Reply = oneshot::Sender<Result<String, String>>;

/// A change requested through the API, answered by the agent loop.
pub enum Command {
    Reload(Reply),
    Drain {
        service: String,
        backend: String,
        drain: bool,
        reply: Reply,
    },
}

/// What the handlers can see.
#[derive(Clone)]
pub struct Api {
    pub applied: watch::Receiver<Arc<Applied>>,
    pub datapath: Arc<Datapath>,
    pub commands: mpsc::Sender<Command>,
    pub probe_latency: ProbeLatency,
    pub health: HealthReader,
    pub flow_tables: watch::Receiver<Vec<TableStatus>>,
    /// Each discovery source's state.
    pub discovery: Board,
}

impl Api {
    fn status(&self) -> Result<Status> {
        let applied = self.applied.borrow().clone();
        let tables = self.flow_tables.borrow().clone();
        let mut status =
            Status::collect(&applied, &self.health.snapshot(), &self.datapath, &tables)?;
        status.discovery = self.discovery.snapshot();
        Ok(status)
    }

    async fn ask(&self, command: impl FnOnce(Reply) -> Command) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(command(tx)).await.is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n").into_response();
        }
        match rx.await {
            Ok(Ok(msg)) => (StatusCode::OK, format!("{msg}\n")).into_response(),
            Ok(Err(msg)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{msg}\n")).into_response(),
            Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "agent is shutting down\n").into_response(),
        }
    }
}

/// Binds the API listener and serves it until the process ends.
pub async fn serve(listen: &ApiListen, api: Api) -> Result<tokio::task::JoinHandle<()>> {
    let router = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .route("/backends/{service}/{backend}/{action}", post(drain))
        .with_state(api);
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

fn internal(e: anyhow::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
}

async fn status(State(api): State<Api>) -> Response {
    match api.status() {
        Ok(status) => Json(status).into_response(),
        Err(e) => internal(e),
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    match api.status() {
        Ok(status) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            metrics::render(&status, &api.probe_latency),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

async fn reload(State(api): State<Api>) -> Response {
    api.ask(Command::Reload).await
}

/// POST /backends/{service}/{backend}/drain or /undrain.
async fn drain(
    State(api): State<Api>,
    Path((service, backend, action)): Path<(String, String, String)>,
) -> Response {
    let drain = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => return (StatusCode::NOT_FOUND, "use drain or undrain\n").into_response(),
    };
    api.ask(|reply| Command::Drain {
        service,
        backend,
        drain,
        reply,
    })
    .await
}

/// A minimal client for the CLI: one request, the status code and the body as text.
pub async fn request(listen: &ApiListen, method: &str, path: &str) -> Result<(u16, String)> {
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "xlb")
        .body(Empty::<Bytes>::new())?;
    let hint = "is `xlb run` up?";
    let response = match listen {
        ApiListen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to the xlb API at {addr} ({hint})"))?;
            http::send(stream, req).await?
        }
        ApiListen::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| {
                    format!("connecting to the xlb API at {} ({hint})", path.display())
                })?;
            http::send(stream, req).await?
        }
    };
    let code = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}
