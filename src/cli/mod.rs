//! The subcommands other than `serve`. Offline, for policy authors and for trying Mandate
//! locally: `check`, `policy validate`, `policy test`, `route test`, `dev token`,
//! `audit verify|keygen` (here); against a running server with the caller's own token: `approvals …` and
//! `grants …` ([`client`], printed by [`render`]), and `mcp wrap` ([`wrap`]: a stdio MCP
//! server behind the server's decisions). Each returns the process exit code.

pub mod client;
pub mod mcp_schema;
pub mod render;
pub mod wrap;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::decision::Engine;
use crate::policy::Bundle;
use crate::vocabulary::Principal;
use crate::vocabulary::{CheckRequest, Outcome, Resource};

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
        // As strict as the API: a duplicate key is an error, not "the last one wins".
        Some(text) => {
            match crate::strict_json::parse_with(text.as_bytes(), crate::api::body::BODY_RULES) {
                Ok(Value::Object(m)) => m,
                Ok(_) => bail!("--context must be a JSON object"),
                Err(e) => bail!("--context is not valid JSON: {e}"),
            }
        }
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

/// `mandate route test METHOD URL`: the original request a proxy would ask about.
#[derive(Debug)]
pub struct RouteTestArgs<'a> {
    pub method: &'a str,
    /// `/path?query`, or `scheme://host/path?query` (the host is then matched too).
    pub url: &'a str,
    /// `name=value` or `name: value`.
    pub headers: &'a [String],
    pub body: Option<&'a str>,
}

/// `mandate route test`: which rule of the configuration a request matches and the check it
/// becomes (the `/v1/check` body it stands for), offline. Exit 0 when a rule or the default
/// action matches, 2 when none does (the request would be denied, `no_route`).
pub fn route_test(config: &Config, args: &RouteTestArgs<'_>) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    let bundle = load_bundle(&config.policy.bundle)?;
    config.check_routes(&bundle)?;
    let headers: Vec<(String, String)> = args
        .headers
        .iter()
        .map(|h| match h.split_once([':', '=']) {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            }
            _ => bail!("--header `{h}` must look like `name=value`"),
        })
        .collect::<anyhow::Result<_>>()?;
    let (url_host, path, query) = split_url(args.url)?;
    let host = url_host.or_else(|| {
        headers
            .iter()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v.clone())
    });
    let found = config
        .routes
        .find(args.method, host.as_deref(), &path)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = match (found.reads_body(), args.body) {
        // As strict as the server: a duplicate key is an error, not "the last one wins".
        (true, Some(text)) => Some(
            crate::strict_json::parse_with(text.as_bytes(), crate::api::body::BODY_RULES)
                .map_err(|e| anyhow::anyhow!("--body is not valid JSON: {e}"))?,
        ),
        _ => None,
    };
    let routed = found
        .resolve(&crate::routes::Inputs {
            headers: &headers,
            query: query.as_deref(),
            body: body.as_ref(),
            extensions: None,
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.field()))?;
    let shown = format!("`{} {}`", args.method, found.path());
    match found.matched {
        crate::routes::Matched::Rule { index, route } => {
            println!("{shown} matches routes[{index}] `{}`", route.name());
        }
        crate::routes::Matched::Default(_) => {
            println!("{shown} matches no route: the default action (forward_auth.default_action)");
        }
        crate::routes::Matched::None => {
            println!(
                "{shown} matches no route, and no forward_auth.default_action is configured: \
                 denied ({})",
                crate::routes::NO_ROUTE
            );
            return Ok(EXIT_DENY);
        }
    }
    println!("{}", serde_json::to_string_pretty(&routed)?);
    Ok(0)
}

/// The host (when the URL has one), the path and the query of `url`.
fn split_url(url: &str) -> anyhow::Result<(Option<String>, String, Option<String>)> {
    let (host, rest) = match url.split_once("://") {
        Some((_, after)) => {
            let end = after.find(['/', '?']).unwrap_or(after.len());
            let (authority, rest) = after.split_at(end);
            let authority = authority.rsplit('@').next().unwrap_or(authority);
            (Some(authority.to_owned()), rest.to_owned())
        }
        None => (None, url.to_owned()),
    };
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest
    };
    if !rest.starts_with('/') {
        bail!(
            "`{url}` is not a URL like `/accounts/acct-1` or `https://api.example.com/accounts/acct-1`"
        );
    }
    let rest = rest.split('#').next().unwrap_or_default();
    Ok(match rest.split_once('?') {
        Some((p, q)) => (host, p.to_owned(), Some(q.to_owned())),
        None => (host, rest.to_owned(), None),
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
    let report = crate::decision::cases::run(&bundle);
    println!("{report}");
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

/// `mandate dev token`: mint a token with the example config's dev key, printing only the
/// token so `TOKEN=$(mandate dev token --sub agent-1)` works. `age` backdates it (issued
/// that long ago), to try what the server says of an expired token without waiting.
pub fn dev_token(
    config: &Config,
    sub: &str,
    claims: &[String],
    ttl: Duration,
    age: Duration,
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
    let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock)
        - i64::try_from(age.as_secs()).context("--age is too long")?;
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

/// `mandate audit verify FILE [--checkpoints F --key K]`: exit 0 when the whole chain holds
/// (and matches every signed checkpoint), 1 at the first broken or missing record (named by
/// its line) or the first checkpoint the log does not match.
pub fn audit_verify(
    file: &Path,
    checkpoints: Option<Checkpoints>,
    key: Option<&str>,
) -> anyhow::Result<u8> {
    use crate::audit::checkpoint::{parse_public_key, verify_checkpoints};
    let wanted = match checkpoints {
        Some(source) => {
            let Some(key) = key else {
                bail!("checkpoints need --key: a checkpoint is only as good as its signature");
            };
            let text = std::fs::read_to_string(key).unwrap_or_else(|_| key.to_owned());
            let Some(public) = parse_public_key(&text) else {
                bail!(
                    "--key: `{key}` is neither a file holding a public key nor one (32 bytes, hex or base64)"
                );
            };
            Some((source.read(file)?, public))
        }
        None if key.is_some() => bail!("--key needs --checkpoints FILE or --store URL"),
        None => None,
    };
    let seqs: std::collections::HashSet<u64> = wanted
        .as_ref()
        .map(|(cps, _)| cps.iter().map(|c| c.seq).collect())
        .unwrap_or_default();
    let mut hashes = std::collections::HashMap::new();
    let report = match crate::audit::verify_visiting(file, |seq, hash| {
        if seqs.contains(&seq) {
            hashes.insert(seq, hex::encode(hash));
        }
    }) {
        Ok(report) => report,
        Err(
            e @ (crate::audit::VerifyError::Line { .. } | crate::audit::VerifyError::Front { .. }),
        ) => {
            println!("{e}");
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "ok: {} records, last hash {}",
        report.records, report.last_hash
    );
    if report.files.len() > 1 || report.first_seq > 1 {
        println!(
            "segments: {} file(s), seq {} to {}",
            report.files.len(),
            report.first_seq,
            report.last_seq
        );
    }
    if report.standalone && report.first_seq > 1 {
        println!(
            "one segment on its own: its link to the records before seq {} is not checked; verify the log's directory for the whole chain",
            report.first_seq
        );
    } else if let Some(t) = report.removed_through.filter(|_| report.first_seq > 1) {
        println!("seq 1 to {t}: deleted by retention, as the log records");
    }
    let Some((cps, public)) = wanted else {
        return Ok(0);
    };
    match verify_checkpoints(&cps, &public, report.first_seq, report.last_seq, |seq| {
        hashes.get(&seq).cloned()
    }) {
        Ok(c) => {
            println!(
                "checkpoints: {} verified; the log is vouched for up to seq {}, {} record(s) after it not yet checkpointed",
                c.verified, c.last_verified_seq, c.uncovered
            );
            if c.before_first > 0 {
                println!(
                    "checkpoints: {} cover records deleted by retention (signatures valid, nothing left to compare)",
                    c.before_first
                );
            }
            Ok(0)
        }
        Err(e) => {
            println!("{e}");
            Ok(1)
        }
    }
}

/// Where `audit verify` reads checkpoints from.
#[derive(Debug, Clone)]
pub enum Checkpoints {
    /// A checkpoint file (JSON lines).
    File(PathBuf),
    /// The approval store at this URL: the checkpoints kept for the log being verified.
    Store(String),
}

impl Checkpoints {
    fn read(self, log: &Path) -> anyhow::Result<Vec<crate::audit::Checkpoint>> {
        match self {
            Checkpoints::File(path) => Ok(crate::audit::checkpoint::read_checkpoints(&path)?),
            Checkpoints::Store(url) => {
                let Some(log_id) = crate::audit::verify::log_id(log)? else {
                    return Ok(Vec::new());
                };
                crate::app::install_crypto()?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let store = crate::store::connect(&url)
                        .await
                        .map_err(|e| anyhow::anyhow!("approval store `{url}`: {e}"))?;
                    store
                        .checkpoints(&log_id)
                        .await
                        .map_err(|e| anyhow::anyhow!("approval store `{url}`: {e}"))
                })
            }
        }
    }
}

/// `mandate audit keygen FILE`: a new checkpoint signing key.
pub fn audit_keygen(file: &Path) -> anyhow::Result<u8> {
    crate::app::install_crypto()?;
    if file.exists() {
        bail!("`{}` exists: not overwriting a key", file.display());
    }
    let pem = crate::audit::CheckpointKey::generate_pem()?;
    let key = crate::audit::CheckpointKey::from_pkcs8(pem.as_bytes(), "new key")?;
    // Readable by its owner only: whoever reads it can sign checkpoints.
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .with_context(|| format!("cannot write `{}`", file.display()))?;
    }
    let mut public = file.as_os_str().to_owned();
    public.push(".pub");
    std::fs::write(&public, format!("{}\n", key.public_hex()))
        .with_context(|| format!("cannot write `{}`", PathBuf::from(&public).display()))?;
    println!("{}", key.public_hex());
    Ok(0)
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
