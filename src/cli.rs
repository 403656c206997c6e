//! The offline subcommands, for policy authors and for trying Mandate locally: `check`,
//! `policy validate`, `policy test`, `dev token`, `audit verify`. Each returns the process
//! exit code.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::decision::{CheckRequest, Engine, Outcome, Resource};
use crate::identity::Principal;
use crate::policy::{self, Bundle};

/// Exit codes of `mandate check`, so scripts can branch on the outcome.
pub const EXIT_ALLOW: u8 = 0;
pub const EXIT_DENY: u8 = 2;
pub const EXIT_ESCALATE: u8 = 3;

fn load_bundle(dir: &Path) -> anyhow::Result<Bundle> {
    Bundle::load(dir)
        .map_err(|e| anyhow::anyhow!("policy bundle `{}` is invalid:\n{e}", dir.display()))
}

/// `Type::id` (the id may itself contain `::`; the type is what precedes the last `::`).
pub fn parse_entity(arg: &str, what: &str) -> anyhow::Result<(String, String)> {
    match arg.rsplit_once("::") {
        Some((kind, id)) if !kind.is_empty() && !id.is_empty() => {
            Ok((kind.to_owned(), id.trim_matches('"').to_owned()))
        }
        _ => bail!("{what} `{arg}` must look like `Type::id`"),
    }
}

/// `key=value`; the value is JSON when it parses as JSON (numbers, booleans, arrays), else a
/// string: `amount=250`, `groups=["a","b"]`, `owner=bob`.
pub fn parse_pair(arg: &str) -> anyhow::Result<(String, Value)> {
    let Some((k, v)) = arg.split_once('=') else {
        bail!("`{arg}` must look like `key=value`");
    };
    if k.is_empty() {
        bail!("`{arg}` has an empty key");
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

fn pairs(args: &[String]) -> anyhow::Result<Map<String, Value>> {
    args.iter().map(|a| parse_pair(a)).collect()
}

#[derive(Debug)]
pub struct CheckArgs<'a> {
    pub bundle: &'a Path,
    pub principal: &'a str,
    pub principal_attrs: &'a [String],
    pub action: &'a str,
    pub resource: &'a str,
    pub resource_attrs: &'a [String],
    pub context: Option<&'a str>,
}

/// `mandate check`: decide one request offline against a bundle and print the decision.
pub fn check(args: &CheckArgs<'_>) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let bundle = load_bundle(args.bundle)?;
    let (pk, pid) = parse_entity(args.principal, "--principal")?;
    let (rk, rid) = parse_entity(args.resource, "--resource")?;
    let principal = Principal::from_parts(&pk, &pid, "cli", pairs(args.principal_attrs)?)
        .context("--principal-attr")?;
    let context = match args.context {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => bail!("--context must be a JSON object"),
            Err(e) => bail!("--context is not valid JSON: {e}"),
        },
    };
    let engine = Engine::new(Arc::new(bundle), crate::clock::system());
    let decision = engine.decide(&CheckRequest {
        principal: Arc::new(principal),
        action: args.action.to_owned(),
        action_properties: None,
        resource: Resource {
            kind: rk,
            id: rid,
            properties: pairs(args.resource_attrs)?,
        },
        context,
    });
    println!("{}", serde_json::to_string_pretty(&decision)?);
    Ok(match decision.outcome {
        Outcome::Allow => EXIT_ALLOW,
        Outcome::Deny => EXIT_DENY,
        Outcome::Escalate => EXIT_ESCALATE,
    })
}

/// `mandate policy validate DIR`.
pub fn policy_validate(dir: &Path) -> anyhow::Result<u8> {
    let bundle = load_bundle(dir)?;
    println!(
        "ok: bundle `{}` revision `{}` version `{}`: {} policies, {} test cases",
        bundle.name(),
        bundle.revision(),
        bundle.version(),
        bundle.policy_count(),
        bundle.tests().len()
    );
    Ok(0)
}

/// `mandate policy test DIR`: exit 1 when any case fails.
pub fn policy_test(dir: &Path) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let bundle = Arc::new(load_bundle(dir)?);
    let report = policy::testing::run(&bundle);
    println!("{report}");
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

/// `mandate dev token`: mint a token with the example config's dev key, printing only the
/// token so `TOKEN=$(mandate dev token --sub agent-1)` works.
pub fn dev_token(
    config: &Config,
    sub: &str,
    claims: &[String],
    ttl: Duration,
) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let Some(dev) = &config.dev else {
        bail!(
            "this configuration has no `[dev]` section: dev tokens are only for the example configuration"
        );
    };
    let Some(issuer) = config.issuers.iter().find(|i| i.name == dev.issuer) else {
        bail!("`dev.issuer` names no configured issuer");
    };
    let Some(audience) = issuer.audiences.first() else {
        bail!("issuer `{}` has no audience", issuer.name);
    };
    let key = std::fs::read(&dev.signing_key).with_context(|| {
        format!(
            "cannot read dev signing key `{}`",
            dev.signing_key.display()
        )
    })?;
    let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock);
    let token = crate::identity::dev::mint(
        &key,
        &dev.kid,
        &issuer.issuer,
        audience,
        sub,
        pairs(claims)?,
        ttl,
        now,
    )
    .map_err(|e| anyhow::anyhow!("cannot mint the dev token: {e}"))?;
    println!("{token}");
    Ok(0)
}

/// `mandate audit verify FILE`: exit 0 when the whole chain holds, 1 at the first broken or
/// missing record (named by its line).
pub fn audit_verify(file: &Path) -> anyhow::Result<u8> {
    match crate::audit::verify(file) {
        Ok(report) => {
            println!(
                "ok: {} records, last hash {}",
                report.records, report.last_hash
            );
            Ok(0)
        }
        Err(e @ crate::audit::VerifyError::Line { .. }) => {
            println!("{e}");
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_arguments() {
        assert_eq!(
            parse_entity("Agent::agent-1", "x").unwrap(),
            ("Agent".into(), "agent-1".into())
        );
        assert_eq!(
            parse_entity("Ns::Account::\"a b\"", "x").unwrap(),
            ("Ns::Account".into(), "a b".into())
        );
        assert!(parse_entity("agent-1", "x").is_err());
    }

    #[test]
    fn pair_values_are_json_when_they_parse() {
        assert_eq!(parse_pair("amount=250").unwrap().1, Value::from(250));
        assert_eq!(parse_pair("owner=bob").unwrap().1, Value::from("bob"));
        assert_eq!(
            parse_pair("groups=[\"a\"]").unwrap().1,
            serde_json::json!(["a"])
        );
        assert!(parse_pair("novalue").is_err());
    }
}

/// One call to a running server's API (`mandate approvals ...`).
#[derive(Debug)]
pub struct ApiCall {
    pub path: String,
    /// `None` for a GET.
    pub body: Option<Value>,
}

impl ApiCall {
    pub fn get(path: String) -> anyhow::Result<Self> {
        Ok(Self { path, body: None })
    }

    pub fn post(path: String, body: Value) -> anyhow::Result<Self> {
        Ok(Self {
            path,
            body: Some(body),
        })
    }

    /// An approve or deny: the rationale and `kind=value` evidence pairs.
    pub fn review(
        id: &str,
        verb: &str,
        rationale: &str,
        evidence: &[String],
    ) -> anyhow::Result<Self> {
        let mut ev = Map::new();
        for e in evidence {
            let Some((k, v)) = e.split_once('=') else {
                bail!("--evidence `{e}` must look like `kind=value`");
            };
            ev.insert(k.to_owned(), Value::String(v.to_owned()));
        }
        Self::post(
            format!("/v1/approvals/{id}/{verb}"),
            serde_json::json!({"rationale": rationale, "evidence": ev}),
        )
    }
}

/// Send `call` with `token` and print the JSON answer; exit 0 on success, 1 on an error
/// answer (which is printed too: it names what was wrong).
pub fn api(server: &str, token: &str, call: ApiCall) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = format!("{}{}", server.trim_end_matches('/'), call.path);
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(75))
            .build()?;
        let req = match call.body {
            None => client.get(&url),
            Some(body) => client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.to_string()),
        };
        let resp = req
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("cannot reach `{url}`"))?;
        let status = resp.status();
        let text = resp.text().await?;
        let pretty = serde_json::from_str::<Value>(&text)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .unwrap_or(text);
        if status.is_success() {
            println!("{pretty}");
            Ok(0)
        } else {
            eprintln!("error: {status}: {pretty}");
            Ok(1)
        }
    })
}
