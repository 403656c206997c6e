//! Bundle loading tests: the shipped bundles, every class of load error, the version digest.

use std::path::Path;
use std::sync::Arc;

use super::*;

const SCHEMA: &str = r#"
type Mandate = { now: Long };
entity Agent = { owner?: String };
entity Account;
action "payments:transfer" appliesTo {
  principal: [Agent], resource: [Account], context: { amount: Long, mandate: Mandate }
};
action "crm:read" appliesTo { principal: [Agent], resource: [Account], context: { mandate: Mandate } };
"#;

const MANIFEST: &str = "name = \"t\"\nrevision = \"7\"\n";

/// A bundle directory with the given `.cedar` files (name, text), the test schema and manifest.
fn bundle_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.cedarschema"), SCHEMA).unwrap();
    std::fs::write(dir.path().join("manifest.toml"), MANIFEST).unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn load_err(files: &[(&str, &str)]) -> BundleError {
    let dir = bundle_dir(files);
    Bundle::load(dir.path()).unwrap_err()
}

fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn example_bundle_loads_and_its_tests_pass() {
    let bundle = Arc::new(Bundle::load(&repo("config/policies")).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(bundle.name(), "example");
    assert_eq!(bundle.revision(), "1");
    assert!(bundle.version().starts_with("1+"));
    assert_eq!(bundle.version().len(), "1+".len() + 16);
    assert_eq!(bundle.digest().len(), 64);
    assert_eq!(
        bundle.actions().collect::<Vec<_>>(),
        vec![
            "approve",
            "crm:export",
            "crm:read",
            "mcp:call",
            "mcp:prompt",
            "mcp:read",
            "mcp:tools/transfer",
            "payments:transfer",
            "tool:shell.exec"
        ]
    );
    assert_eq!(bundle.policy_count(), 14);
    let meta = bundle.policy_meta("payments-approval").unwrap();
    assert_eq!(meta.file, Path::new("payments.cedar"));
    assert_eq!(meta.line, 13);
    assert!(
        bundle
            .policy_text("payments-approval")
            .unwrap()
            .contains("@fallback_after(\"30m\")")
    );
    // Only the policies of the action are in its slice.
    assert_eq!(
        bundle
            .slice("payments:transfer")
            .unwrap()
            .conditions()
            .len(),
        4
    );
    assert_eq!(bundle.slice("crm:read").unwrap().conditions().len(), 1);
    assert!(bundle.tests().len() >= 14);
    let report = crate::decision::cases::run(&bundle);
    assert!(report.ok(), "{report}");
}

#[test]
fn authzen_fixture_loads_and_its_tests_pass() {
    let bundle =
        Arc::new(Bundle::load(&repo("tests/fixtures/authzen")).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(bundle.tests().len(), 11);
    let report = crate::decision::cases::run(&bundle);
    assert!(report.ok(), "{report}");
    assert_eq!(report.passed, 11);
}

#[test]
fn ids_default_to_file_stem_and_index() {
    let dir = bundle_dir(&[(
        "pay.cedar",
        "permit (principal, action == Action::\"crm:read\", resource);\n\n\
         permit (principal, action == Action::\"crm:read\", resource);\n",
    )]);
    let b = Bundle::load(dir.path()).unwrap();
    assert_eq!(b.policy_meta("pay.0").unwrap().line, 1);
    assert_eq!(b.policy_meta("pay.1").unwrap().line, 3);
}

#[test]
fn duplicate_id_names_both_files() {
    let p = "@id(\"same\")\npermit (principal, action == Action::\"crm:read\", resource);\n";
    let err = load_err(&[("a.cedar", p), ("b.cedar", p)]);
    assert_eq!(err.problems.len(), 1, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("b.cedar:1: policy `same`: duplicate policy id"),
        "{msg}"
    );
    assert!(msg.contains("a.cedar:1`"), "{msg}");
}

#[test]
fn annotation_errors_name_policy_and_line() {
    let text = "\n\
        @id(\"bad-ttl\") @approval(\"a\") @grant_ttl(\"forever\")\n\
        permit (principal, action == Action::\"crm:read\", resource);\n\
        @id(\"bad-date\") @owner(\"o\") @recertify_by(\"2027-13-01\")\n\
        permit (principal, action == Action::\"crm:read\", resource);\n\
        @id(\"lonely-quorum\") @quorum(\"2\")\n\
        permit (principal, action == Action::\"crm:read\", resource);\n\
        @id(\"forbid-approval\") @approval(\"a\")\n\
        forbid (principal, action == Action::\"crm:read\", resource);\n";
    let err = load_err(&[("p.cedar", text)]);
    let lines: Vec<String> = err.to_string().lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 4, "{err}");
    let expect = [
        ("p.cedar:2: policy `bad-ttl`: `@grant_ttl(\"forever\")`", 0),
        (
            "p.cedar:4: policy `bad-date`: `@recertify_by(\"2027-13-01\")`",
            1,
        ),
        (
            "p.cedar:6: policy `lonely-quorum`: `@quorum` requires `@approval`",
            2,
        ),
        (
            "p.cedar:8: policy `forbid-approval`: `@approval` is not allowed on a forbid",
            3,
        ),
    ];
    for (want, i) in expect {
        assert!(
            lines[i].contains(want),
            "{} does not contain {want}",
            lines[i]
        );
    }
}

#[test]
fn schema_violation_names_file_and_line() {
    let text = "// first\n\
        @id(\"typo\")\n\
        permit (principal, action == Action::\"payments:transfer\", resource)\n\
        when { context.amuont > 1 };\n";
    let err = load_err(&[("pay.cedar", text)]);
    let msg = err.to_string();
    assert!(msg.contains("pay.cedar:4: policy `typo`:"), "{msg}");
    assert!(msg.contains("amuont"), "{msg}");
}

#[test]
fn parse_error_has_a_line_and_all_files_are_reported() {
    let err = load_err(&[
        (
            "a.cedar",
            "\n\npermit (principal, action, resource) when { ;\n",
        ),
        (
            "b.cedar",
            "permit (principal == ?principal, action, resource);\n",
        ),
    ]);
    let msg = err.to_string();
    assert!(msg.contains("a.cedar:3: "), "{msg}");
    assert!(
        msg.contains("b.cedar:1: templates are not supported"),
        "{msg}"
    );
}

#[test]
fn manifest_and_schema_are_required_and_strict() {
    let dir = tempfile::tempdir().unwrap();
    let err = Bundle::load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("manifest.toml: missing"), "{msg}");
    assert!(msg.contains("schema.cedarschema: missing"), "{msg}");

    let dir = bundle_dir(&[]);
    std::fs::write(
        dir.path().join("manifest.toml"),
        "name = \"t\"\nrevision = \"1\"\nsigned = true\n",
    )
    .unwrap();
    let msg = Bundle::load(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("manifest.toml:3: unknown field `signed`"),
        "{msg}"
    );
}

#[test]
fn bad_entities_are_reported() {
    let err = load_err(&[(
        "entities.json",
        r#"[{"uid": {"type": "Agent", "id": "a"}, "attrs": {"owner": 3}, "parents": []}]"#,
    )]);
    assert!(err.to_string().contains("entities.json"), "{err}");
}

#[test]
fn test_file_errors_name_the_case_and_key() {
    let yaml = "cases:\n\
        \x20 - name: first\n\
        \x20   principal: { type: Agent, id: a }\n\
        \x20   action: crm:read\n\
        \x20   resource: { type: Account, id: x }\n\
        \x20   expect: allow\n\
        \x20   expcet: deny\n";
    let err = load_err(&[("tests/t.yaml", yaml)]);
    let msg = err.to_string();
    assert!(msg.contains("tests/t.yaml:"), "{msg}");
    assert!(msg.contains("case 0 `first`"), "{msg}");
    assert!(msg.contains("unknown field `expcet`"), "{msg}");
}

#[test]
fn failing_case_loads_and_is_reported_by_run() {
    let yaml = "cases:\n\
        \x20 - name: wrongly expects allow\n\
        \x20   principal: { type: Agent, id: a }\n\
        \x20   action: crm:read\n\
        \x20   resource: { type: Account, id: x }\n\
        \x20   expect: allow\n";
    let dir = bundle_dir(&[("tests/t.yaml", yaml)]);
    let bundle = Arc::new(Bundle::load(dir.path()).unwrap());
    let report = crate::decision::cases::run(&bundle);
    assert_eq!(report.passed, 0);
    assert_eq!(report.failed.len(), 1);
    let text = report.to_string();
    assert!(
        text.contains("`wrongly expects allow`: expected allow, got deny"),
        "{text}"
    );
    assert!(text.contains("no_matching_policy"), "{text}");
}

/// A bundle mounted from a Kubernetes ConfigMap: each key is a link into `..data`, itself a
/// link to a timestamped directory that an update replaces whole. It must load exactly as the
/// same files copied plainly (it once loaded with no policies at all), and an update must be
/// seen by the next load (what SIGHUP does).
#[test]
fn bundle_mounted_as_configmap_links_loads_like_plain_files() {
    use std::os::unix::fs::symlink;
    let files = [
        "approvals.cedar",
        "crm.cedar",
        "manifest.toml",
        "payments.cedar",
        "schema.cedarschema",
        "tools.cedar",
    ];
    let plain = tempfile::tempdir().unwrap();
    let mounted = tempfile::tempdir().unwrap();
    let first = mounted.path().join("..2026_12_02_10_00_00.1");
    std::fs::create_dir(&first).unwrap();
    for name in &files {
        let text = std::fs::read(repo("config/policies").join(name)).unwrap();
        std::fs::write(plain.path().join(name), &text).unwrap();
        std::fs::write(first.join(name), &text).unwrap();
        symlink(Path::new("..data").join(name), mounted.path().join(name)).unwrap();
    }
    symlink("..2026_12_02_10_00_00.1", mounted.path().join("..data")).unwrap();

    let expected = Bundle::load(plain.path()).unwrap_or_else(|e| panic!("{e}"));
    let loaded = Bundle::load(mounted.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.policy_count(), 8);
    assert_eq!(loaded.policy_count(), expected.policy_count());
    assert_eq!(loaded.version(), expected.version());

    // The kubelet's update: a new directory, then `..data` swapped to it in one rename.
    let second = mounted.path().join("..2026_12_02_11_00_00.2");
    std::fs::create_dir(&second).unwrap();
    for name in &files {
        std::fs::copy(first.join(name), second.join(name)).unwrap();
    }
    std::fs::write(second.join("tools.cedar"), "").unwrap();
    symlink("..2026_12_02_11_00_00.2", mounted.path().join("..data.tmp")).unwrap();
    std::fs::rename(
        mounted.path().join("..data.tmp"),
        mounted.path().join("..data"),
    )
    .unwrap();
    let reloaded = Bundle::load(mounted.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reloaded.policy_count(), 7);
    assert_ne!(reloaded.version(), loaded.version());

    // A policy file that is a link to nothing is a load error naming it, never left out:
    // had it held a `forbid`, leaving it out would allow what it forbids (fail closed).
    symlink("..data/gone.cedar", mounted.path().join("gone.cedar")).unwrap();
    let err = Bundle::load(mounted.path()).unwrap_err().to_string();
    assert!(err.contains("gone.cedar"), "{err}");
}

#[test]
fn version_changes_when_any_file_changes() {
    let dir = bundle_dir(&[
        (
            "p.cedar",
            "permit (principal, action == Action::\"crm:read\", resource);\n",
        ),
        ("entities.json", "[]"),
        ("tests/t.yaml", "cases: []\n"),
    ]);
    let v0 = Bundle::load(dir.path()).unwrap().version();
    assert_eq!(
        v0,
        Bundle::load(dir.path()).unwrap().version(),
        "deterministic"
    );
    let edits: [(&str, &str); 5] = [
        (
            "p.cedar",
            "permit (principal, action == Action::\"crm:read\", resource); \n",
        ),
        ("entities.json", "[ ]"),
        ("tests/t.yaml", "cases: [ ]\n"),
        ("manifest.toml", "name = \"t\"\nrevision = \"7\" \n"),
        ("schema.cedarschema", &format!("{SCHEMA}\n")),
    ];
    let mut seen = vec![v0];
    for (name, text) in edits {
        std::fs::write(dir.path().join(name), text).unwrap();
        let v = Bundle::load(dir.path()).unwrap().version();
        assert!(!seen.contains(&v), "{name}: version did not change");
        seen.push(v);
    }
    // A new file counts too.
    std::fs::write(dir.path().join("q.cedar"), "").unwrap();
    let v = Bundle::load(dir.path()).unwrap().version();
    assert!(!seen.contains(&v));
}

#[test]
fn action_groups_and_unscoped_policies_are_sliced() {
    let schema = r#"
        entity Agent; entity Doc;
        action reads;
        action "doc:read" in [reads] appliesTo { principal: [Agent], resource: [Doc] };
        action "doc:list" in [reads] appliesTo { principal: [Agent], resource: [Doc] };
        action "doc:write" appliesTo { principal: [Agent], resource: [Doc] };
    "#;
    let dir = bundle_dir(&[(
        "p.cedar",
        "@id(\"group\") permit (principal, action in Action::\"reads\", resource);\n\
             @id(\"any\") forbid (principal, action, resource) when { false };\n\
             @id(\"write\") permit (principal, action == Action::\"doc:write\", resource);\n\
             @id(\"bg\") @breakglass permit (principal, action in [Action::\"doc:write\"], resource);\n",
    )]);
    std::fs::write(dir.path().join("schema.cedarschema"), schema).unwrap();
    let b = Bundle::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let ids = |action: &str| {
        let mut v: Vec<String> = b
            .slice(action)
            .unwrap()
            .conditions()
            .iter()
            .map(|c| c.id.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids("doc:read"), vec!["any", "group"]);
    assert_eq!(ids("doc:list"), vec!["any", "group"]);
    assert_eq!(ids("doc:write"), vec!["any", "write"]);
    assert_eq!(
        b.slice("doc:write").unwrap().breakglass().num_of_policies(),
        1
    );
    assert_eq!(b.policy_meta("bg").unwrap().kind, PolicyKind::Breakglass);
}
