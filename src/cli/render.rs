//! How the CLI prints the approvals API's answers for people: aligned tables for lists, a
//! short labelled summary for one request (and, for `show`, the Cedar source of the policies
//! that asked), one sentence for a review, a cancellation or a revocation. `--output json`
//! prints the API's answer instead, and `--output id` only the ids.

use std::fmt::Write as _;

use serde_json::Value;

use super::client::{Answer, Output};
use crate::vocabulary::GrantScope;

/// The whole printout of a successful answer, ending in a newline (or empty).
pub fn answer(kind: Answer, v: &Value, output: Output) -> String {
    let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock);
    match output {
        Output::Json => {
            let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
            s.push('\n');
            s
        }
        Output::Id => ids(kind, v),
        Output::Table => match kind {
            Answer::Requests => requests_table(v, now),
            Answer::Request => request_summary(v, now),
            Answer::RequestWithPolicies => request_summary(v, now) + &policy_texts(v),
            Answer::Review => review_sentence(v, now),
            Answer::Grants => grants_table(v, now),
            Answer::Grant => revoke_sentence(v),
        },
    }
}

/// An error answer `{"error", "message", "field"?}` on one line.
pub fn api_error(v: &Value) -> String {
    match (v["error"].as_str(), v["message"].as_str()) {
        (Some(code), Some(message)) => match v["field"].as_str() {
            Some(field) => format!("{code}: {message} (field `{field}`)"),
            None => format!("{code}: {message}"),
        },
        _ => v.to_string(),
    }
}

fn ids(kind: Answer, v: &Value) -> String {
    let list: Vec<&Value> = match kind {
        Answer::Requests => v["requests"].as_array().map(|a| a.iter().collect()),
        Answer::Grants => v["grants"].as_array().map(|a| a.iter().collect()),
        Answer::Request | Answer::RequestWithPolicies | Answer::Grant => Some(vec![v]),
        // The grant an approval made; nothing when the review left no grant.
        Answer::Review => Some(
            v.get("grant")
                .filter(|g| !g.is_null())
                .into_iter()
                .collect(),
        ),
    }
    .unwrap_or_default();
    list.iter()
        .filter_map(|item| item["id"].as_str())
        .map(|id| format!("{id}\n"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// `Type::id`
fn entity(v: &Value) -> String {
    format!("{}::{}", str_of(v, "type"), str_of(v, "id"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `in 59m`, `3m ago`: the distance from `now` to an RFC 3339 time, to the coarsest unit
/// that still says something (hours and minutes, minutes, seconds).
pub fn relative(at: &str, now: i64) -> String {
    use time::format_description::well_known::Rfc3339;
    let Ok(t) = time::OffsetDateTime::parse(at, &Rfc3339) else {
        return String::new();
    };
    let delta = t.unix_timestamp() - now;
    let d = delta.unsigned_abs();
    let span = match d {
        0..60 => format!("{d}s"),
        60..3600 => format!("{}m", d / 60),
        _ if d % 3600 / 60 == 0 => format!("{}h", d / 3600),
        _ => format!("{}h{}m", d / 3600, d % 3600 / 60),
    };
    if delta >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// Columns padded to their widest cell, separated by two spaces; the last one unpadded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn requester(p: &Value) -> String {
    let mut who = entity(p);
    let chain = strings(&p["acting_for"]);
    if !chain.is_empty() {
        let _ = write!(who, " for {}", chain.join(" for "));
    }
    who
}

fn requests_table(v: &Value, now: i64) -> String {
    let requests = v["requests"].as_array().cloned().unwrap_or_default();
    if requests.is_empty() {
        return "no approval requests you may review\n".into();
    }
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|r| {
            vec![
                str_of(r, "id").to_owned(),
                str_of(r, "status").to_owned(),
                requester(&r["principal"]),
                str_of(r, "action").to_owned(),
                entity(&r["resource"]),
                strings(&r["current_groups"]).join(","),
                r["quorum"].to_string(),
                relative(str_of(r, "expires_at"), now),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATUS",
            "REQUESTER",
            "ACTION",
            "RESOURCE",
            "APPROVERS",
            "QUORUM",
            "EXPIRES",
        ],
        &rows,
    )
}

fn grants_table(v: &Value, now: i64) -> String {
    let grants = v["grants"].as_array().cloned().unwrap_or_default();
    if grants.is_empty() {
        return "no active grants (--all lists expired and revoked ones too)\n".into();
    }
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            let expires = str_of(g, "expires_at");
            let status = if g["revoked"].as_bool() == Some(true) {
                "revoked"
            } else if relative(expires, now).ends_with("ago") {
                "expired"
            } else {
                "active"
            };
            vec![
                str_of(g, "id").to_owned(),
                str_of(g, "approval_request").to_owned(),
                status.to_owned(),
                format!("{expires} ({})", relative(expires, now)),
            ]
        })
        .collect();
    table(&["ID", "REQUEST", "STATUS", "EXPIRES"], &rows)
}

/// A JSON value on one line when short, else indented under its label.
fn json_field(v: &Value) -> String {
    let line = v.to_string();
    if line.chars().count() <= 72 {
        return line;
    }
    serde_json::to_string_pretty(v)
        .unwrap_or(line)
        .replace('\n', "\n             ")
}

fn request_summary(r: &Value, now: i64) -> String {
    let p = &r["principal"];
    let mut who = vec![format!("issuer {}", str_of(p, "issuer"))];
    if let Some(owner) = p["owner"].as_str() {
        who.push(format!("owner {owner}"));
    }
    let chain = strings(&p["acting_for"]);
    if !chain.is_empty() {
        who.push(format!("acting for {}", chain.join(", then ")));
    }
    let mut rows: Vec<(&str, String)> = vec![
        ("request", str_of(r, "id").to_owned()),
        ("status", str_of(r, "status").to_owned()),
        ("requester", format!("{} ({})", entity(p), who.join("; "))),
        ("action", str_of(r, "action").to_owned()),
    ];
    let mut resource = entity(&r["resource"]);
    if let Some(props) = r["resource"]["properties"].as_object()
        && !props.is_empty()
    {
        let _ = write!(resource, " {}", json_field(&r["resource"]["properties"]));
    }
    rows.push(("resource", resource));
    rows.push(("context", json_field(&r["context"])));
    rows.push((
        "policy",
        format!(
            "{} (version {})",
            strings(&r["policy_ids"]).join(", "),
            str_of(r, "policy_version")
        ),
    ));
    rows.push((
        "approvers",
        format!(
            "{}, quorum {}",
            strings(&r["current_groups"]).join(", "),
            r["quorum"]
        ),
    ));
    let evidence = strings(&r["evidence"]);
    if !evidence.is_empty() {
        rows.push(("evidence", evidence.join(", ")));
    }
    if let Some(group) = r["fallback"]["group"].as_str() {
        rows.push((
            "fallback",
            format!("{group} after {}", str_of(&r["fallback"], "after")),
        ));
    }
    let scope = grant_scope(r);
    rows.push((
        "grant",
        format!(
            "lasts {} once approved; covers {}",
            str_of(r, "grant_ttl"),
            scope.covers()
        ),
    ));
    let expires = str_of(r, "expires_at");
    rows.push(("expires", format!("{expires} ({})", relative(expires, now))));
    rows.push(("binding", str_of(r, "binding_hash").to_owned()));
    let mut out = String::new();
    for (label, value) in rows {
        let _ = writeln!(out, "{label:<11}  {value}");
    }
    out
}

/// The Cedar source of each policy that asked for approval, verbatim, under a header naming
/// it and the version it is from.
pub fn policy_texts(v: &Value) -> String {
    let version = v["policy_version"].as_str().unwrap_or("?");
    let texts = v["policy_text"].as_object();
    let mut out = String::new();
    for id in strings(&v["policy_ids"]) {
        let _ = write!(out, "\n// policy `{id}`, policy version {version}:\n");
        match texts.and_then(|t| t.get(id)).and_then(Value::as_str) {
            Some(text) => {
                out.push_str(text.trim_end());
                out.push('\n');
            }
            None => out.push_str("// (no policy text was stored with this request)\n"),
        }
    }
    out
}

/// What a request's grant covers; older servers do not say, and their grants cover exactly the
/// request.
fn grant_scope(r: &Value) -> GrantScope {
    r["grant_scope"]
        .as_str()
        .and_then(GrantScope::parse)
        .unwrap_or_default()
}

fn review_sentence(v: &Value, now: i64) -> String {
    let r = &v["request"];
    let id = str_of(r, "id");
    match (str_of(r, "status"), v.get("grant").filter(|g| !g.is_null())) {
        ("approved", Some(g)) => {
            let expires = str_of(g, "expires_at");
            format!(
                "approved: request {id}; grant {} allows {} until {expires} ({})\n",
                str_of(g, "id"),
                grant_scope(r).covers(),
                relative(expires, now)
            )
        }
        ("pending", _) => format!(
            "recorded: request {id} stays pending until {} approvers have approved\n",
            r["quorum"]
        ),
        (status, _) => format!("{status}: request {id}\n"),
    }
}

fn revoke_sentence(g: &Value) -> String {
    format!(
        "revoked: grant {} (request {}); the same request escalates again\n",
        str_of(g, "id"),
        str_of(g, "approval_request")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn relative_times_read_as_people_say_them() {
        let now = 1_800_000_000;
        let at = |d: i64| crate::clock::rfc3339(now + d);
        assert_eq!(relative(&at(3599), now), "in 59m");
        assert_eq!(relative(&at(3600), now), "in 1h");
        assert_eq!(relative(&at(5400), now), "in 1h30m");
        assert_eq!(relative(&at(42), now), "in 42s");
        assert_eq!(relative(&at(-180), now), "3m ago");
        assert_eq!(relative("not a time", now), "");
    }

    #[test]
    fn tables_align_every_column_but_the_last() {
        let t = table(
            &["ID", "STATUS", "EXPIRES"],
            &[
                vec!["a".into(), "pending".into(), "in 1h".into()],
                vec!["bbbb".into(), "ok".into(), "in 2m".into()],
            ],
        );
        assert_eq!(
            t,
            "ID    STATUS   EXPIRES\na     pending  in 1h\nbbbb  ok       in 2m\n"
        );
    }

    #[test]
    fn show_prints_the_summary_then_policy_texts_verbatim() {
        let v = json!({
            "id": "r1", "status": "pending", "binding_hash": "h",
            "principal": {"type": "Agent", "id": "agent-1", "issuer": "iss", "owner": "bob",
                          "acting_for": ["alice"], "attributes": {}},
            "action": "payments:transfer",
            "resource": {"type": "Account", "id": "acct-1", "properties": {}},
            "context": {"amount": 300},
            "policy_version": "1+abc",
            "policy_ids": ["p1", "p2"],
            "policy_text": {"p1": "@id(\"p1\")\npermit (principal, action, resource);\n"},
            "current_groups": ["finance-approvers"], "quorum": 1, "evidence": ["ticket"],
            "grant_ttl": "1h", "fallback": {"group": "finance-leads", "after": "30m"},
            "expires_at": "2026-11-29T19:00:00Z",
        });
        let out = answer(Answer::RequestWithPolicies, &v, Output::Table);
        let (summary, texts) = out.split_once("\n\n").unwrap();
        assert!(
            summary
                .contains("requester    Agent::agent-1 (issuer iss; owner bob; acting for alice)"),
            "{summary}"
        );
        assert!(
            summary.contains("context      {\"amount\":300}"),
            "{summary}"
        );
        assert!(
            summary.contains("fallback     finance-leads after 30m"),
            "{summary}"
        );
        assert!(!summary.contains("permit"), "{summary}");
        assert_eq!(
            texts,
            "// policy `p1`, policy version 1+abc:\n@id(\"p1\")\npermit (principal, action, resource);\n\
             \n// policy `p2`, policy version 1+abc:\n// (no policy text was stored with this request)\n"
        );
        // JSON output is the API's answer, policy texts included.
        let json_out = answer(Answer::RequestWithPolicies, &v, Output::Json);
        assert_eq!(serde_json::from_str::<Value>(&json_out).unwrap(), v);
    }

    #[test]
    fn id_output_prints_only_ids() {
        let list = json!({"requests": [{"id": "a"}, {"id": "b"}]});
        assert_eq!(answer(Answer::Requests, &list, Output::Id), "a\nb\n");
        let review = json!({"request": {"id": "r"}, "grant": {"id": "g"}});
        assert_eq!(answer(Answer::Review, &review, Output::Id), "g\n");
        let pending = json!({"request": {"id": "r"}, "grant": null});
        assert_eq!(answer(Answer::Review, &pending, Output::Id), "");
    }

    #[test]
    fn errors_name_code_message_and_field() {
        let e = json!({"error": "invalid_request", "message": "required", "field": "rationale"});
        assert_eq!(
            api_error(&e),
            "invalid_request: required (field `rationale`)"
        );
    }
}
