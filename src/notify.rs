//! Outbound webhook notifications about approval requests: created, moved to fallback,
//! approved, denied, expired. JSON bodies with a Slack-compatible `text` field.
//!
//! Notifications are a courtesy to approvers, never a part of the approval itself: the
//! request and its state live in the store first, and a webhook that fails (or a full queue)
//! loses no approval. Each delivery is retried with exponential backoff.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::approval::ApprovalRequest;

/// Pending notifications held in memory; past this, new ones are dropped with a warning
/// (the requests themselves are safe in the store).
const QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub urls: Vec<String>,
    /// Attempts per delivery, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled after each failure.
    pub backoff: Duration,
}

/// Sends notifications in the background. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Value>>,
}

impl Notifier {
    /// No webhooks configured: notifications go nowhere.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Start the delivery task (needs a tokio runtime).
    pub fn start(settings: WebhookSettings) -> Self {
        if settings.urls.is_empty() {
            return Self::disabled();
        }
        let (tx, mut rx) = mpsc::channel::<Value>(QUEUE);
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhook client cannot be built; notifications are off");
                return Self::disabled();
            }
        };
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                for url in &settings.urls {
                    // One task per delivery: a slow or failing webhook delays no other.
                    tokio::spawn(deliver(
                        client.clone(),
                        url.clone(),
                        body.clone(),
                        settings.max_attempts,
                        settings.backoff,
                    ));
                }
            }
        });
        Self { tx: Some(tx) }
    }

    /// Queue a notification about `request`; never blocks, never fails the caller.
    pub fn send(&self, event: &str, request: &ApprovalRequest) {
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send(body(event, request)).is_err() {
            tracing::warn!(event, request_id = %request.id, "notification queue full; notification dropped");
        }
    }
}

fn body(event: &str, r: &ApprovalRequest) -> Value {
    let text = match event {
        "created" => format!(
            "Approval needed: `{}` wants `{}` on `{}::{}` ({} approval{} from {}). Request {}",
            r.principal.id,
            r.action,
            r.resource.kind,
            r.resource.id,
            r.quorum,
            if r.quorum == 1 { "" } else { "s" },
            r.current_groups.join(" or "),
            r.id
        ),
        "fallback" => format!(
            "Nobody answered in time: request {} (`{}` on `{}::{}`) now waits for {}",
            r.id,
            r.action,
            r.resource.kind,
            r.resource.id,
            r.current_groups.join(" or ")
        ),
        other => format!(
            "Request {} (`{}` on `{}::{}`) is {other}",
            r.id, r.action, r.resource.kind, r.resource.id
        ),
    };
    json!({
        "event": event,
        "text": text,
        "request": {
            "id": r.id.to_string(),
            "status": r.status.as_str(),
            "requester": {"type": r.principal.kind, "id": r.principal.id},
            "action": r.action,
            "resource": {"type": r.resource.kind, "id": r.resource.id},
            "groups": r.current_groups,
            "quorum": r.quorum,
            "expires_at": r.expires_at,
            "status_url": format!("/v1/approvals/{}", r.id),
        },
    })
}

async fn deliver(
    client: reqwest::Client,
    url: String,
    body: Value,
    max_attempts: u32,
    backoff: Duration,
) {
    let mut wait = backoff;
    for attempt in 1..=max_attempts.max(1) {
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(%url, attempt, status = %r.status(), "webhook refused"),
            Err(e) => tracing::warn!(%url, attempt, error = %e, "webhook unreachable"),
        }
        if attempt < max_attempts {
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
    }
    tracing::error!(%url, event = %body["event"], "webhook gave up after {max_attempts} attempts");
}
