//! The README as a newcomer reads it: `scripts/tour` pastes every ```` ```sh tour ```` block
//! into one shell against a fresh `mandate serve` (the example configuration, port 0) and
//! fails on any answer that differs from the one the README shows. And the CLI's own
//! conveniences: completions, the token from the environment, output for people and scripts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::process::Command;

use common::{Killed, mandate, repo};

#[test]
fn the_readme_tour_prints_what_the_readme_shows() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = common::spawn_serve(&dir.path().join("audit.jsonl"));
    let _server = Killed(child);
    let out = Command::new(repo().join("scripts/tour"))
        .current_dir(repo())
        .args(["--server", &format!("http://{addr}")])
        .env("MANDATE_BIN", env!("CARGO_BIN_EXE_mandate"))
        .env_remove("MANDATE_TOKEN")
        .output()
        .expect("scripts/tour runs (python3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("print what the README shows"), "{stdout}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_mandate()"),
        ("zsh", "#compdef mandate"),
        ("fish", "complete -c mandate"),
    ] {
        let out = mandate().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("approvals"), "{shell}: subcommands completed");
    }
}

#[test]
fn the_token_comes_from_the_flag_or_the_environment_and_its_absence_is_named() {
    let out = mandate()
        .args(["approvals", "list"])
        .env_remove("MANDATE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token") && err.contains("MANDATE_TOKEN"),
        "{err}"
    );
    // The usage line does not present the token as required.
    let help = mandate().args(["approvals", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(
        !usage.contains("--token <TOKEN>") || usage.contains("[--token"),
        "{usage}"
    );
}

#[test]
fn check_prints_the_http_api_keys() {
    let out = mandate()
        .args([
            "check",
            "--principal",
            "Agent::agent-1",
            "--action",
            "payments:transfer",
            "--resource",
            "Account::acct-1",
            "--context",
            "{\"amount\":50}",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "allow");
    assert!(
        v["decision_id"].as_str().is_some_and(|id| id.len() == 36),
        "{v}"
    );
    assert!(v.get("outcome").is_none() && v.get("id").is_none(), "{v}");
    assert!(
        v.get("approval").is_none(),
        "no null approval on an allow: {v}"
    );
}
