//! A webhook endpoint for tests: records every request and answers as the test says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub id: String,
    pub delivery_count: u64,
    pub body: serde_json::Value,
    pub headers: HashMap<String, String>,
    pub status: u16,
    pub at: Instant,
}

type Responder = dyn Fn(&Hit) -> (u16, Duration) + Send + Sync;

#[derive(Clone)]
struct Shared {
    hits: Arc<Mutex<Vec<Hit>>>,
    respond: Arc<Mutex<Arc<Responder>>>,
}

pub struct WebhookServer {
    pub addr: SocketAddr,
    shared: Shared,
    _runtime: std::thread::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl WebhookServer {
    /// Answers 200 at once to everything.
    pub fn start() -> Self {
        Self::start_with(|_| (200, Duration::ZERO))
    }

    /// `respond` picks the status and a delay for each request.
    pub fn start_with(respond: impl Fn(&Hit) -> (u16, Duration) + Send + Sync + 'static) -> Self {
        let shared = Shared {
            hits: Arc::default(),
            respond: Arc::new(Mutex::new(Arc::new(respond))),
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new()
                    .route("/{*path}", post(handle))
                    // Entries may be huge (the chaos matrix posts a 5 MB field).
                    .layer(axum::extract::DefaultBodyLimit::disable())
                    .with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr: addr_rx.recv().unwrap(),
            shared,
            _runtime: thread,
            stop: Some(stop_tx),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Changes how the server answers from now on.
    pub fn set_responder(&self, respond: impl Fn(&Hit) -> (u16, Duration) + Send + Sync + 'static) {
        *self.shared.respond.lock().unwrap() = Arc::new(respond);
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// Requests answered 2xx, by entry id.
    pub fn handled(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for h in self.shared.hits.lock().unwrap().iter() {
            if (200..300).contains(&h.status) {
                *out.entry(h.id.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        self.shared.hits.lock().unwrap().len()
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A responder status of 299 means: answer 200 with `X-Streamworker-Drop: not mine`.
pub const DROP: u16 = 299;

async fn handle(
    State(state): State<Shared>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let mut hit = Hit {
        path,
        id: json["id"].as_str().unwrap_or_default().to_owned(),
        delivery_count: json["delivery_count"].as_u64().unwrap_or(0),
        body: json,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        status: 0,
        at: Instant::now(),
    };
    let respond = state.respond.lock().unwrap().clone();
    let (status, delay) = respond(&hit);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    hit.status = status;
    state.hits.lock().unwrap().push(hit);
    if status == DROP {
        return (StatusCode::OK, [("x-streamworker-drop", "not mine")]).into_response();
    }
    StatusCode::from_u16(status).unwrap().into_response()
}
