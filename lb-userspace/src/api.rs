//! The agent's HTTP API, on two listeners. The read API (`agent.api`, 127.0.0.1:9900 by
//! default, or a unix socket) serves `GET /status` (JSON) and `GET /metrics` (Prometheus
//! text). The control socket (`agent.control`, a unix socket only root or
//! `agent.control_group` may open) also takes `POST /reload` and
//! `POST /backends/{service}/{backend}/drain` (or `/undrain`); the read API takes those only
//! with the bearer token of `agent.control_token_file`, and so does `GET /trace` (it shows
//! client addresses). Handlers only read; changes go to the
//! agent loop as commands, so the agent stays the only writer.
use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::{self, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use self::gate::Gate;
use crate::{
    config::{AgentConfig, ApiListen},
    datapath::Datapath,
    discovery::supervise::Board,
    flowtables::TableStatus,
    health::HealthReader,
    http,
    metrics::{self, ProbeLatency},
    status::{Applied, Status},
};

mod gate;
mod listen;
mod trace;

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
    /// Where the data path's maps are pinned (`xlb trace` opens its ring buffer there).
    pub pin_path: std::path::PathBuf,
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

/// What a listener's handlers see: the API, and who may change state through it.
#[derive(Clone)]
struct Served {
    api: Api,
    gate: Gate,
}

/// The listeners, bound before the agent touches the data path: a socket path taken by
/// something else, or a bad token file, stops it before anything changes.
pub struct Listeners {
    control: tokio::net::UnixListener,
    api: ApiSocket,
    /// Who may change state through the read API.
    read_gate: Gate,
}

enum ApiSocket {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listeners {
    /// Binds the control socket, then the read API.
    pub async fn bind(agent: &AgentConfig) -> Result<Listeners> {
        let control = crate::config::parse_control(&agent.control).map_err(anyhow::Error::msg)?;
        let read_gate = match &agent.control_token_file {
            Some(file) => Gate::Token {
                token: gate::read_token(file)?,
                control: control.clone(),
            },
            None => Gate::Closed {
                control: control.clone(),
            },
        };
        let control_listener = listen::control(&control, agent.control_group.as_deref())?;
        info!(path = %control.display(), group = ?agent.control_group, "control socket listening");
        let api = match ApiListen::parse(&agent.api).map_err(anyhow::Error::msg)? {
            ApiListen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the API to {addr}"))?;
                info!(%addr, "API listening");
                ApiSocket::Tcp(listener)
            }
            ApiListen::Unix(path) => {
                let listener = listen::api(&path)?;
                info!(path = %path.display(), "API listening");
                ApiSocket::Unix(listener)
            }
        };
        Ok(Listeners {
            control: control_listener,
            api,
            read_gate,
        })
    }

    /// Serves both until the process ends.
    pub fn serve(self, api: Api) -> Vec<tokio::task::JoinHandle<()>> {
        let control = router(api.clone(), Gate::Open);
        let read = router(api, self.read_gate);
        let control = spawn(self.control, control);
        let read = match self.api {
            ApiSocket::Tcp(listener) => tokio::spawn(async move {
                let _ = axum::serve(listener, read).await;
            }),
            ApiSocket::Unix(listener) => spawn(listener, read),
        };
        vec![control, read]
    }
}

fn spawn(listener: tokio::net::UnixListener, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

fn router(api: Api, gate: Gate) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/reload", post(reload))
        .route("/trace", get(trace::trace))
        .route("/backends/{service}/{backend}/{action}", post(drain))
        .method_not_allowed_fallback(wrong_method)
        .with_state(Served { api, gate })
}

async fn wrong_method() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        "GET /status and /metrics; POST /reload and /backends/SERVICE/BACKEND/drain|undrain \
         (on the control socket)\n",
    )
        .into_response()
}

fn internal(e: anyhow::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
}

async fn status(State(Served { api, .. }): State<Served>) -> Response {
    match api.status() {
        Ok(status) => Json(status).into_response(),
        Err(e) => internal(e),
    }
}

async fn metrics(State(Served { api, .. }): State<Served>) -> Response {
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

async fn reload(State(served): State<Served>, headers: HeaderMap) -> Response {
    if let Some(refused) = served.gate.refusal(&headers) {
        return refused;
    }
    served.api.ask(Command::Reload).await
}

/// POST /backends/{service}/{backend}/drain or /undrain.
async fn drain(
    State(served): State<Served>,
    headers: HeaderMap,
    extract::Path((service, backend, action)): extract::Path<(String, String, String)>,
) -> Response {
    if let Some(refused) = served.gate.refusal(&headers) {
        return refused;
    }
    let drain = match action.as_str() {
        "drain" => true,
        "undrain" => false,
        _ => return (StatusCode::NOT_FOUND, "use drain or undrain\n").into_response(),
    };
    served
        .api
        .ask(|reply| Command::Drain {
            service,
            backend,
            drain,
            reply,
        })
        .await
}

/// A minimal client for the CLI: one request to the read API, the status code and the
/// body as text.
pub async fn request(listen: &ApiListen, method: &str, path: &str) -> Result<(u16, String)> {
    let hint = "is `xlb run` up?";
    match listen {
        ApiListen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to the xlb API at {addr} ({hint})"))?;
            exchange(stream, method, path).await
        }
        ApiListen::Unix(path_) => {
            let stream = tokio::net::UnixStream::connect(path_)
                .await
                .with_context(|| {
                    format!("connecting to the xlb API at {} ({hint})", path_.display())
                })?;
            exchange(stream, method, path).await
        }
    }
}

/// One request to the control socket at `socket`.
pub async fn control(socket: &Path, method: &str, path: &str) -> Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "only root, or a member of agent.control_group, may steer the agent"
            }
            _ => "is `xlb run` up? is this its agent.control?",
        };
        anyhow::Error::new(e).context(format!(
            "connecting to the xlb control socket {} ({hint})",
            socket.display()
        ))
    })?;
    exchange(stream, method, path).await
}

/// A GET on the control socket whose body is JSON lines (`/trace`): each line goes to
/// `line` as it arrives. Returns the status code, and the body when it is not 200.
pub async fn control_lines(
    socket: &Path,
    path: &str,
    mut line: impl FnMut(&str),
) -> Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the xlb control socket {}", socket.display()))?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "xlb")
        .body(Empty::<Bytes>::new())?;
    let response = http::send(stream, req).await?;
    let code = response.status().as_u16();
    let mut body = response.into_body();
    if code != 200 {
        let text = body.collect().await?.to_bytes();
        return Ok((code, String::from_utf8_lossy(&text).into_owned()));
    }
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let rest = pending.split_off(end + 1);
            line(String::from_utf8_lossy(&pending[..end]).as_ref());
            pending = rest;
        }
    }
    Ok((code, String::new()))
}

async fn exchange<S>(stream: S, method: &str, path: &str) -> Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "xlb")
        .body(Empty::<Bytes>::new())?;
    let response = http::send(stream, req).await?;
    let code = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}
