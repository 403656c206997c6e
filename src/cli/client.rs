//! `mandate approvals …` and `mandate grants …`: calls to a running server's API with the
//! caller's own token, answers printed for people (tables and summaries, see
//! [`super::render`]) or, with `--output json`, as the API's JSON.

use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use super::render;

/// How an answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables and short summaries, for people.
    Table,
    /// The API's JSON answer, pretty-printed, for scripts (`jq`).
    Json,
    /// Only the ids, one per line (`ID=$(mandate approvals list -o id | head -n1)`).
    Id,
}

/// What a successful answer is, so it can be printed for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `{"requests": [...]}`
    Requests,
    /// One request (`cancel`).
    Request,
    /// One request and, for people, the Cedar source of the policies that asked (`show`).
    RequestWithPolicies,
    /// `{"request": ..., "grant": ...}` after an approve or deny.
    Review,
    /// `{"grants": [...]}`
    Grants,
    /// One grant (`revoke`).
    Grant,
}

/// One call to a running server's API.
#[derive(Debug)]
pub struct ApiCall {
    pub path: String,
    /// Query parameters, percent-encoded when sent.
    pub query: Vec<(&'static str, String)>,
    /// `None` for a GET.
    pub body: Option<Value>,
    pub answer: Answer,
}

impl ApiCall {
    pub fn get(path: String, answer: Answer) -> Self {
        Self {
            path,
            query: Vec::new(),
            body: None,
            answer,
        }
    }

    pub fn post(path: String, answer: Answer) -> Self {
        Self {
            path,
            query: Vec::new(),
            body: Some(Value::Object(Map::new())),
            answer,
        }
    }

    /// Adds `name=value` to the query when `value` is set.
    pub fn param(mut self, name: &'static str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.query.push((name, v));
        }
        self
    }

    /// An approve or deny: the rationale and `kind=value` evidence pairs.
    pub fn review(
        id: &str,
        verb: &str,
        rationale: &str,
        evidence: &[String],
        binding_hash: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut ev = Map::new();
        for e in evidence {
            let Some((k, v)) = e.split_once('=') else {
                bail!("--evidence `{e}` must look like `kind=value`");
            };
            if ev
                .insert(k.to_owned(), Value::String(v.to_owned()))
                .is_some()
            {
                bail!("--evidence `{k}` is given twice");
            }
        }
        let mut body = serde_json::json!({"rationale": rationale, "evidence": ev});
        if let (Some(hash), Some(obj)) = (binding_hash, body.as_object_mut()) {
            obj.insert("binding_hash".into(), Value::String(hash.to_owned()));
        }
        Ok(Self {
            body: Some(body),
            ..Self::post(format!("/v1/approvals/{id}/{verb}"), Answer::Review)
        })
    }
}

/// The bearer token: `--token`, else `MANDATE_TOKEN` (clap reads both into one value).
pub fn require_token(token: Option<String>) -> anyhow::Result<String> {
    match token {
        Some(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => bail!(
            "no token: pass --token TOKEN or set MANDATE_TOKEN (an approver's token to review, the requesting agent's to wait or cancel)"
        ),
    }
}

/// Send `call` with `token` and print the answer; exit 0 on success, 1 on an error answer
/// (printed to stderr: it names what was wrong).
pub fn api(server: &str, token: &str, call: ApiCall, output: Output) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let base = format!("{}{}", server.trim_end_matches('/'), call.path);
    let url = reqwest::Url::parse_with_params(&base, &call.query)
        .with_context(|| format!("--server: `{base}` is not a URL"))?;
    let (status, text): (_, String) = runtime.block_on(async {
        let client = reqwest::Client::builder()
            // A long poll (`show --wait`) may take up to 60 s.
            .timeout(Duration::from_secs(75))
            .build()?;
        let req = match &call.body {
            None => client.get(url.clone()),
            Some(body) => client
                .post(url.clone())
                .header("content-type", "application/json")
                .body(body.to_string()),
        };
        let resp = req
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("cannot reach `{url}`"))?;
        let status = resp.status();
        anyhow::Ok((status, resp.text().await?))
    })?;
    let parsed = serde_json::from_str::<Value>(&text);
    if !status.is_success() {
        let shown = match &parsed {
            Ok(v) => render::api_error(v),
            Err(_) => text,
        };
        eprintln!("error: {status}: {shown}");
        return Ok(1);
    }
    let Ok(value) = parsed else {
        bail!("the server's answer is not JSON: {text}");
    };
    print!("{}", render::answer(call.answer, &value, output));
    Ok(0)
}
