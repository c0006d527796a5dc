//! One HTTP/1 request over an already connected stream (TCP or unix socket): the client
//! side shared by the CLI (to the agent's API) and discovery (to the Docker API).
use anyhow::Result;
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};

/// Sends `req` on `stream` and returns the response, its body still to be read.
pub async fn send<S>(
    stream: S,
    req: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // Drives the connection; it ends once `sender` is dropped and the response is read.
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}
