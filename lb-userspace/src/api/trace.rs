//! `GET /trace?service=S&from=CIDR&count=N`: traced packets as JSON lines, streamed while
//! the client listens (control socket, or the read API with the control token).
use std::{collections::HashMap, convert::Infallible};

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use ipnet::IpNet;
use tokio::sync::mpsc;

use super::Served;
use crate::{
    state::DesiredState,
    trace::{Line, Session, boot_offset},
};

#[derive(Default)]
struct TraceQuery {
    service: Option<String>,
    from: Option<String>,
    /// Records to send, then the stream ends (0 or absent: until the client leaves).
    count: Option<usize>,
}

/// `service=S&from=CIDR&count=N` (the CLI sends names, addresses and numbers: nothing to
/// unescape).
fn parse_query(query: &str) -> Result<TraceQuery, String> {
    let mut q = TraceQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "service" => q.service = Some(value.to_string()),
            "from" => q.from = Some(value.to_string()),
            "count" => {
                q.count = Some(
                    value
                        .parse()
                        .map_err(|_| format!("count={value}: not a number"))?,
                )
            }
            _ => return Err(format!("unknown parameter {key}")),
        }
    }
    Ok(q)
}

fn bad(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

pub async fn trace(State(served): State<Served>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = served.gate.refusal(&headers) {
        return refused;
    }
    let q = match parse_query(uri.query().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return bad(e),
    };
    let names: HashMap<u32, String> = served
        .api
        .applied
        .borrow()
        .services
        .iter()
        .map(|s| (s.id, s.name.clone()))
        .collect();
    // A dual-stack service's name traces both of its halves.
    let service_ids = match &q.service {
        None => None,
        Some(name) => {
            let mut ids: Vec<u32> = names
                .iter()
                .filter(|(_, n)| DesiredState::names(name, n))
                .map(|(id, _)| *id)
                .collect();
            ids.sort_unstable();
            match ids.as_slice() {
                [] => return bad(format!("no service {name}")),
                [one] => Some([*one; 2]),
                [a, b, ..] => Some([*a, *b]),
            }
        }
    };
    let from = match q.from.as_deref().map(parse_from).transpose() {
        Ok(from) => from,
        Err(e) => return bad(e),
    };
    let mut session = match Session::start(&served.api.pin_path, service_ids, from) {
        Ok(s) => s,
        Err(e) => return (StatusCode::CONFLICT, format!("{e:#}\n")).into_response(),
    };
    let count = q.count.unwrap_or(0);
    let (tx, mut rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let offset = boot_offset();
        let mut sent = 0;
        while count == 0 || sent < count {
            let record = tokio::select! {
                _ = tx.closed() => break,
                r = session.next() => match r {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            let name = names.get(&record.service_id).map_or("?", String::as_str);
            let line = Line::from_record(&record, name, offset);
            let mut json = serde_json::to_string(&line).unwrap_or_default();
            json.push('\n');
            if tx.send(json).await.is_err() {
                break;
            }
            sent += 1;
        }
        // The session drops here: the data path stops tracing.
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|line| line.map(Ok::<_, Infallible>))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A CIDR or a single address.
fn parse_from(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("--from {text}: not an IP address or CIDR"))
}
