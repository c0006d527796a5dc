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
    extract::{self, RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
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
    events::EventLog,
    flowtables::TableStatus,
    health::HealthReader,
    http,
    metrics::{self, ProbeLatency},
    status::{Applied, Status},
};

mod gate;
pub mod history;
mod listen;
mod page;
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
    /// What changed recently, fed by the agent.
    pub events: EventLog,
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
    /// The rates of the last minutes, for the status page.
    history: history::History,
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
        let history = history::History::default();
        let sampler = tokio::spawn(sample(api.clone(), history.clone()));
        let control = router(api.clone(), Gate::Open, history.clone());
        let read = router(api, self.read_gate, history);
        let control = spawn(self.control, control);
        let read = match self.api {
            ApiSocket::Tcp(listener) => tokio::spawn(async move {
                let _ = axum::serve(listener, read).await;
            }),
            ApiSocket::Unix(listener) => spawn(listener, read),
        };
        vec![control, read, sampler]
    }
}

/// Reads the counters into `history` every `history::EVERY`.
async fn sample(api: Api, history: history::History) {
    let mut every = tokio::time::interval(history::EVERY);
    loop {
        every.tick().await;
        if let Ok(status) = api.status() {
            history.add(&status, std::time::Instant::now());
        }
    }
}

fn spawn(listener: tokio::net::UnixListener, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

fn router(api: Api, gate: Gate, history: history::History) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/history", get(rates))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/explain", get(explain))
        .route("/flows", get(flows))
        .route("/reload", post(reload))
        .route("/trace", get(trace::trace))
        .route("/backends/{service}/{backend}/{action}", post(drain))
        .method_not_allowed_fallback(wrong_method)
        .with_state(Served { api, gate, history })
}

async fn wrong_method() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        "GET /, /status, /metrics, /events, /history, /explain and /flows; POST /reload and /backends/SERVICE/BACKEND/drain|undrain \
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

/// GET /: the status page.
async fn status_page(State(Served { api, .. }): State<Served>) -> Response {
    match api.status() {
        Ok(status) => {
            let events = api.events.latest(page::EVENTS_SHOWN);
            Html(page::render(&status, &events).into_string()).into_response()
        }
        Err(e) => internal(e),
    }
}

/// GET /explain?from=IP:PORT&to=VIP:PORT[&proto=tcp|udp]: the data path's answer for a flow.
async fn explain(
    State(Served { api, .. }): State<Served>,
    extract::Query(q): extract::Query<ExplainQuery>,
) -> Response {
    let parse = |what: &str, text: &str| {
        text.parse::<std::net::SocketAddr>()
            .map_err(|_| format!("{what}={text}: not IP:PORT ([IPv6]:PORT)\n"))
    };
    let query = match (parse("from", &q.from), parse("to", &q.to)) {
        (Ok(from), Ok(to)) => crate::explain::Query {
            from,
            to,
            proto: q.proto.unwrap_or_default(),
        },
        (Err(e), _) | (_, Err(e)) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    match api
        .status()
        .and_then(|status| crate::explain::explain(&api.datapath, &status, &query))
    {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => internal(e),
    }
}

/// GET /history: per service and backend, packets/s and new flows/s of the last 10 minutes.
async fn rates(State(Served { history, .. }): State<Served>) -> Response {
    Json(history.json()).into_response()
}

/// GET /events[?since=SEQ]: the recent events (newer than SEQ), oldest first, one JSON
/// object a line.
async fn events(State(Served { api, .. }): State<Served>, RawQuery(query): RawQuery) -> Response {
    let since = match query_value(query.as_deref(), "since").map(str::parse::<u64>) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "since=SEQ takes a number\n").into_response();
        }
    };
    let mut body = String::new();
    for event in api.events.since(since) {
        if let Ok(line) = serde_json::to_string(&event) {
            body.push_str(&line);
            body.push('\n');
        }
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// The value of `name` in a query string (`a=1&since=5`), if there.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    proto: Option<crate::config::Protocol>,
}

/// GET /flows[?service=S&backend=ADDR:PORT&limit=N]: flows in the tables, least idle first.
async fn flows(
    State(Served { api, .. }): State<Served>,
    extract::Query(filter): extract::Query<crate::flows::Filter>,
) -> Response {
    // A full table takes tens of milliseconds to read: off the async workers.
    let listed = tokio::task::spawn_blocking(move || {
        let status = api.status()?;
        crate::flows::list(&api.datapath, &status, &filter)
    })
    .await;
    match listed {
        Ok(Ok(list)) => Json(list).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e.into()),
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
