//! deploy/: every file is checked for what Mandate relies on, against Mandate's own view of it
//! where there is one. The Kubernetes configuration is parsed by Mandate's parser, its policy
//! bundle loaded from a ConfigMap's layout of links, and served for real (the cluster's keys
//! replaced by the dev key); the manifests, Istio and Envoy files are parsed as YAML and their
//! ports, paths, audiences, headers, clusters and fail-closed settings compared with that
//! configuration; the Dockerfile's build context is checked to be enough for cargo; the
//! systemd unit goes through `systemd-analyze verify` and `security` where systemd is
//! installed. `kubectl kustomize` builds both kustomizations where kubectl is installed. There
//! is no Docker daemon, Envoy or Istio here: those files are checked statically.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step must stop the test loudly"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mandate::config::Config;
use mandate::identity::{JwksSource, Profile};
use serde::Deserialize;
use serde_json::{Value, json};

use common::repo;

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML file, as JSON values.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document expected");
    docs.remove(0)
}

/// `v` at a dotted path (`spec.template.spec`); a missing step fails naming the path.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .unwrap_or_else(|| panic!("`{path}` missing at `{key}` in {v}"));
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string in {v}"))
}

fn list<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    at(v, path)
        .as_array()
        .unwrap_or_else(|| panic!("`{path}` is not a list in {v}"))
}

fn strings(v: &Value, path: &str) -> BTreeSet<String> {
    list(v, path)
        .iter()
        .map(|x| x.as_str().expect("string").to_owned())
        .collect()
}

/// The item of a list whose `key` is `value` (a container, a volume, a cluster by name).
fn named<'a>(items: &'a [Value], key: &str, value: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i.get(key).and_then(Value::as_str) == Some(value))
        .unwrap_or_else(|| panic!("no item with {key} = {value:?}"))
}

/// A protobuf Duration as YAML writes it: `0.2s`, `200ms`.
fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("duration {text:?}: {e}"))
}

/// `keys` of an object must all be known: a misspelt field (`failOpen` as `failopen`) would be
/// dropped silently by the proxy's config loader, or refused at deploy time.
fn known_keys(v: &Value, what: &str, known: &[&str]) {
    for key in v.as_object().expect("object").keys() {
        assert!(
            known.contains(&key.as_str()),
            "{what}: unknown field `{key}`"
        );
    }
}

const EXT_AUTHZ_TIMEOUT: Duration = Duration::from_millis(200);

/// The Kubernetes configuration, as Mandate reads it (nothing from the environment).
fn k8s_config() -> Config {
    let path = repo().join("deploy/kubernetes/mandate.toml");
    Config::parse(&read("deploy/kubernetes/mandate.toml"), &path, &[])
        .unwrap_or_else(|e| panic!("deploy/kubernetes/mandate.toml: {e}"))
}

fn k8s_listen() -> SocketAddr {
    k8s_config().server.listen.expect("a TCP listener")
}

fn kustomization() -> Value {
    yaml("deploy/kubernetes/kustomization.yaml")
}

/// The files a `configMapGenerator` entry puts in its ConfigMap (paths in deploy/kubernetes).
fn generated_files(name: &str) -> Vec<String> {
    let k = kustomization();
    let generator = named(list(&k, "configMapGenerator"), "name", name);
    list(generator, "files")
        .iter()
        .map(|f| f.as_str().expect("file").to_owned())
        .collect()
}

fn pod_spec() -> Value {
    let docs = yaml_docs("deploy/kubernetes/deployment.yaml");
    let deployment = named(&docs, "kind", "Deployment");
    at(deployment, "spec.template.spec").clone()
}

fn pod_labels() -> serde_json::Map<String, Value> {
    let docs = yaml_docs("deploy/kubernetes/deployment.yaml");
    let deployment = named(&docs, "kind", "Deployment");
    at(deployment, "spec.template.metadata.labels")
        .as_object()
        .expect("labels")
        .clone()
}

fn sidecar(pod: &Value) -> Value {
    named(list(pod, "initContainers"), "name", "mandate").clone()
}

/// Where the volume `volume` is mounted in `container` (its mount entry).
fn mount<'a>(container: &'a Value, volume: &str) -> &'a Value {
    named(list(container, "volumeMounts"), "name", volume)
}

/// The port number a probe's `port` names (a number, or the name of a container port).
fn probe_port(container: &Value, probe: &str) -> u64 {
    let port = at(container, &format!("{probe}.httpGet.port"));
    match port {
        Value::Number(n) => n.as_u64().expect("port"),
        Value::String(name) => at(
            named(list(container, "ports"), "name", name),
            "containerPort",
        )
        .as_u64()
        .expect("port"),
        other => panic!("{probe} port {other}"),
    }
}

/// The Dockerfile, one instruction per entry (continuations joined, comments dropped), split
/// into its stages; the global `ARG`s before the first `FROM` make stage 0.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = read("deploy/Dockerfile");
    let mut stages: Vec<Vec<(String, String)>> = vec![Vec::new()];
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            pending.push_str(body);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let (word, rest) = full.split_once(' ').unwrap_or((&full, ""));
        let word = word.to_ascii_uppercase();
        if word == "FROM" {
            stages.push(Vec::new());
        } else if stages.len() == 1 {
            assert_eq!(word, "ARG", "only ARG may come before the first FROM");
        }
        let stage = stages.last_mut().expect("a stage");
        stage.push((word, rest.trim().to_owned()));
    }
    stages
}

fn instruction<'a>(stage: &'a [(String, String)], word: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(w, _)| w == word)
        .map(|(_, rest)| rest.as_str())
        .collect()
}

/// `.dockerignore` as Docker reads this one: patterns `*`, `name` and `!name` on top-level
/// names, the last match winning. Anything fancier is refused, so this reading stays exact.
fn docker_context_includes(path: &str) -> bool {
    let top = path.split('/').next().expect("path");
    let mut included = true;
    for line in read(".dockerignore").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (allow, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        assert!(
            pattern == "*" || !pattern.contains(['*', '?', '[', '/']),
            ".dockerignore: pattern `{line}` is beyond what this test reads"
        );
        if pattern == "*" || pattern == top {
            included = allow;
        }
    }
    included
}

#[test]
fn dockerfile_builds_a_locked_non_root_image_of_the_binary() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 3, "a multi-stage build");
    let (build, runtime) = (&stages[1], stages.last().expect("stage"));
    // The toolchain the crate declares as its minimum (Cargo.toml's rust-version).
    assert_eq!(
        instruction(&stages[0], "ARG"),
        [format!("RUST_VERSION={}", env!("CARGO_PKG_RUST_VERSION"))]
    );
    assert!(instruction(build, "FROM")[0].starts_with("rust:${RUST_VERSION}-"));
    assert!(
        instruction(runtime, "FROM")[0].starts_with("gcr.io/distroless/"),
        "a runtime image without shell or package manager"
    );
    let builds: Vec<&str> = instruction(build, "RUN")
        .into_iter()
        .filter(|r| r.contains("cargo build"))
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build");
    for flag in ["--release", "--locked", "--bin mandate"] {
        assert!(builds[0].contains(flag), "cargo build without {flag}");
    }

    // Non-root by number (Kubernetes' runAsNonRoot can only verify a numeric user), the same
    // user as the pod's.
    let user = instruction(runtime, "USER");
    assert_eq!(user.len(), 1);
    let uid: u64 = user[0].split(':').next().unwrap().parse().expect("numeric");
    assert_ne!(uid, 0, "USER must not be root");
    let pod = pod_spec();
    assert_eq!(at(&pod, "securityContext.runAsUser").as_u64(), Some(uid));

    let exec_form = |word: &str| -> Vec<String> {
        let v = instruction(runtime, word);
        assert_eq!(v.len(), 1, "one {word}");
        serde_json::from_str(v[0]).unwrap_or_else(|_| panic!("{word} in exec form"))
    };
    assert_eq!(exec_form("ENTRYPOINT"), ["/mandate"]);
    let cmd = exec_form("CMD");
    assert_eq!(cmd[..2], ["serve", "--config"]);
    // The configuration the image reads by default is the file the Deployment mounts.
    assert_eq!(
        s(mount(&sidecar(&pod), "mandate-config"), "mountPath"),
        cmd[2]
    );
    let exposed: Vec<&str> = instruction(runtime, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .collect();
    assert!(exposed.contains(&k8s_listen().port().to_string().as_str()));
    assert!(exposed.contains(&"9191"), "the gRPC ext_authz port");
    assert!(
        instruction(runtime, "HEALTHCHECK").is_empty(),
        "distroless has nothing to run a HEALTHCHECK with"
    );

    // The build stage's COPY sources exist, pass .dockerignore, and are all cargo needs.
    let mut sources = Vec::new();
    for copy in instruction(build, "COPY") {
        let words: Vec<&str> = copy
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            assert!(repo().join(src).exists(), "COPY {src}: no such path");
            assert!(
                docker_context_includes(src),
                ".dockerignore leaves out {src}"
            );
            sources.push((*src).to_owned());
        }
    }
    for secret in ["target", ".git", "data", "config"] {
        assert!(
            !docker_context_includes(secret),
            "{secret} must stay out of the build context"
        );
    }
    // Directories that macros read at compile time (`sqlx::migrate!("migrations/…")`).
    let mut sources_rs = Vec::new();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources_rs.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    for text in &sources_rs {
        for (at, m) in text.match_indices("migrate!(\"") {
            let dir = text[at + m.len()..].split(['/', '"']).next().unwrap();
            assert!(
                sources.iter().any(|s| s == dir),
                "migrate! reads {dir}/, which the Dockerfile does not copy"
            );
        }
    }
    cargo_accepts_the_build_context(&sources);
}

/// Cargo reads the manifest whole (every declared target's file must exist) before it runs the
/// compiler. With a compiler that fails at once (`RUSTC=/bin/false`), a context missing a file
/// the manifest needs fails on the manifest; a complete one gets as far as asking the compiler
/// its version.
fn cargo_accepts_the_build_context(sources: &[String]) {
    let ctx = tempfile::tempdir().unwrap();
    for src in sources {
        let from = repo().join(src);
        if from.is_dir() {
            common::copy_dir(&from, &ctx.path().join(src));
        } else {
            std::fs::copy(&from, ctx.path().join(src)).unwrap();
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(ctx.path())
        .args([
            "build",
            "--offline",
            "--locked",
            "--release",
            "--bin",
            "mandate",
        ])
        .arg("--target-dir")
        .arg(ctx.path().join("target"))
        .env("RUSTC", "/bin/false")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .expect("cargo runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("failed to parse manifest") && err.contains("/bin/false -vV"),
        "the Dockerfile's build context is not enough for cargo:\n{err}"
    );
}

/// H-10: the listener is reachable from the pod's IP only because the kubelet's probes need
/// it; the NetworkPolicy admits no other ingress. And the sidecar's mounts, ports and probes
/// are where its configuration says.
#[test]
fn h10_kubernetes_sidecar_matches_its_configuration() {
    let config = k8s_config();
    let pod = pod_spec();
    let mandate = sidecar(&pod);

    // A native sidecar: started before the agent, stopped after it.
    assert_eq!(s(&mandate, "restartPolicy"), "Always");
    assert_eq!(s(&mandate, "image"), "mandate");
    let k = kustomization();
    let image = named(list(&k, "images"), "name", "mandate");
    assert_eq!(s(image, "newTag"), env!("CARGO_PKG_VERSION"));

    let listen = k8s_listen();
    assert!(
        listen.ip().is_unspecified(),
        "the kubelet probes the pod's IP"
    );
    let port = named(list(&mandate, "ports"), "name", "http");
    assert_eq!(
        at(port, "containerPort").as_u64(),
        Some(u64::from(listen.port()))
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(s(&mandate, &format!("{probe}.httpGet.path")), path);
        assert_eq!(probe_port(&mandate, probe), u64::from(listen.port()));
    }

    // Hardening, for both containers; the pod runs as the image's non-root user.
    assert_eq!(at(&pod, "securityContext.runAsNonRoot"), &json!(true));
    assert_eq!(
        s(&pod, "securityContext.seccompProfile.type"),
        "RuntimeDefault"
    );
    assert_eq!(at(&pod, "automountServiceAccountToken"), &json!(false));
    let agent = named(list(&pod, "containers"), "name", "agent").clone();
    for c in [&mandate, &agent] {
        let sc = at(c, "securityContext");
        assert_eq!(at(sc, "runAsNonRoot"), &json!(true));
        assert_eq!(at(sc, "readOnlyRootFilesystem"), &json!(true));
        assert_eq!(at(sc, "allowPrivilegeEscalation"), &json!(false));
        assert!(strings(sc, "capabilities.drop").contains("ALL"));
        assert_eq!(s(sc, "seccompProfile.type"), "RuntimeDefault");
    }

    // Sized from the benchmarks; no CPU limit (throttling stalls every check behind it).
    let resources = at(&mandate, "resources");
    for key in ["requests.cpu", "requests.memory", "limits.memory"] {
        at(resources, key);
    }
    assert!(at(resources, "limits").get("cpu").is_none());

    // Every path the configuration names is mounted where it says.
    let volumes = list(&pod, "volumes");
    let volume = |name: &str| named(volumes, "name", name);
    let config_mount = mount(&mandate, "mandate-config");
    assert_eq!(s(config_mount, "subPath"), "mandate.toml");
    assert_eq!(
        s(volume("mandate-config"), "configMap.name"),
        "mandate-config"
    );
    assert_eq!(generated_files("mandate-config"), ["mandate.toml"]);

    let bundle_mount = mount(&mandate, "mandate-bundle");
    assert_eq!(
        Path::new(s(bundle_mount, "mountPath")),
        config.policy.bundle
    );
    assert_eq!(
        s(volume("mandate-bundle"), "configMap.name"),
        "mandate-bundle"
    );

    let data = mount(&mandate, "mandate-data");
    assert!(data.get("readOnly").is_none_or(|r| r == &json!(false)));
    assert!(volume("mandate-data").get("emptyDir").is_some());
    let data_dir = Path::new(s(data, "mountPath"));
    assert!(
        config.audit.path.starts_with(data_dir),
        "audit log off the data volume"
    );
    assert!(
        Path::new(&config.store.url).starts_with(data_dir),
        "SQLite store off the data volume"
    );

    let issuer = &config.issuers[0];
    let Some(JwksSource::Url {
        url,
        ca_file: Some(ca_file),
        ..
    }) = &issuer.jwks
    else {
        panic!("the issuer's keys from the API server, through the cluster's CA");
    };
    assert!(url.starts_with("https://kubernetes.default.svc/"));
    let ca = volume("kube-ca");
    assert_eq!(s(ca, "configMap.name"), "kube-root-ca.crt");
    let item = &list(ca, "configMap.items")[0];
    assert_eq!(s(item, "key"), "ca.crt");
    assert_eq!(
        Path::new(s(mount(&mandate, "kube-ca"), "mountPath")).join(s(item, "path")),
        *ca_file
    );
    assert!(config.log.json, "one JSON object per log line");

    // The agent finds Mandate on the pod's loopback.
    let env = list(&agent, "env");
    let url = s(named(env, "name", "MANDATE_SERVER"), "value");
    assert_eq!(url, format!("http://127.0.0.1:{}", listen.port()));

    // No ingress but the node's (the kubelet's probes, which no NetworkPolicy blocks).
    let policy = yaml("deploy/kubernetes/networkpolicy.yaml");
    assert_eq!(s(&policy, "kind"), "NetworkPolicy");
    let labels = pod_labels();
    for (k, v) in at(&policy, "spec.podSelector.matchLabels")
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(k), Some(v), "the policy selects the agent's pod");
    }
    assert!(strings(&policy, "spec.policyTypes").contains("Ingress"));
    assert!(list(&policy, "spec.ingress").is_empty());

    // Every manifest of the directory is in the kustomization.
    let listed = strings(&k, "resources");
    for e in std::fs::read_dir(repo().join("deploy/kubernetes")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name),
                "{name} is not in kustomization.yaml"
            );
        }
    }
}

/// J-37: the agent's token is minted for Mandate only, lives within what Mandate accepts, and
/// sits where the agent is told to read it.
#[test]
fn j37_projected_token_is_for_mandate_only() {
    let config = k8s_config();
    let pod = pod_spec();
    let token = named(list(&pod, "volumes"), "name", "mandate-token");
    let sources = list(token, "projected.sources");
    assert_eq!(sources.len(), 1);
    let sa = at(&sources[0], "serviceAccountToken");
    let audience = s(sa, "audience");
    assert_eq!(config.issuers.len(), 1);
    let issuer = &config.issuers[0];
    assert_eq!(issuer.profile, Profile::Kubernetes);
    assert_eq!(issuer.audiences, [audience]);
    assert!(
        !audience.starts_with("https://kubernetes"),
        "never the API server's audience"
    );
    let lifetime = Duration::from_secs(at(sa, "expirationSeconds").as_u64().unwrap());
    assert!(lifetime >= Duration::from_secs(600), "Kubernetes' minimum");
    assert!(lifetime <= issuer.max_lifetime, "Mandate would refuse it");

    let agent = named(list(&pod, "containers"), "name", "agent");
    let mount_path = s(mount(agent, "mandate-token"), "mountPath");
    let file = s(
        named(list(agent, "env"), "name", "MANDATE_TOKEN_FILE"),
        "value",
    );
    assert_eq!(Path::new(mount_path).join(s(sa, "path")), Path::new(file));
    // The sidecar does not need the agent's token.
    assert!(
        list(&sidecar(&pod), "volumeMounts")
            .iter()
            .all(|m| s(m, "name") != "mandate-token")
    );
}

/// The bundle ConfigMap is the example bundle (without its tests), file for file, every file
/// listed in the generator; mounted as the kubelet mounts a ConfigMap (each key a link into
/// `..data`), it loads every policy.
#[test]
fn kubernetes_bundle_is_the_example_bundle_and_loads_from_a_configmap() {
    let listed: BTreeSet<String> = generated_files("mandate-bundle").into_iter().collect();
    let in_dir: BTreeSet<String> = std::fs::read_dir(repo().join("deploy/kubernetes/bundle"))
        .unwrap()
        .map(|e| format!("bundle/{}", e.unwrap().file_name().into_string().unwrap()))
        .collect();
    assert_eq!(listed, in_dir, "every bundle file listed, and only those");
    let example = repo().join("config/policies");
    for e in std::fs::read_dir(&example).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            let name = e.file_name().into_string().unwrap();
            assert_eq!(
                std::fs::read(e.path()).unwrap(),
                std::fs::read(repo().join("deploy/kubernetes/bundle").join(&name))
                    .unwrap_or_default(),
                "deploy/kubernetes/bundle/{name} differs from config/policies/{name}: copy it"
            );
        }
    }

    let mounted = configmap_volume("mandate-bundle");
    let loaded = mandate::policy::Bundle::load(mounted.path()).unwrap_or_else(|e| panic!("{e}"));
    let expected = mandate::policy::Bundle::load(&example).unwrap();
    assert_eq!(loaded.policy_count(), expected.policy_count());
    assert_eq!(loaded.name(), expected.name());
}

/// A generated ConfigMap as the kubelet mounts it: the files in a timestamped directory,
/// `..data` linking to it, and one link per key.
fn configmap_volume(generator: &str) -> tempfile::TempDir {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let stamp = "..2026_12_02_10_00_00.123456789";
    std::fs::create_dir(dir.path().join(stamp)).unwrap();
    symlink(stamp, dir.path().join("..data")).unwrap();
    for file in generated_files(generator) {
        let key = Path::new(&file).file_name().unwrap();
        std::fs::copy(
            repo().join("deploy/kubernetes").join(&file),
            dir.path().join(stamp).join(key),
        )
        .unwrap();
        symlink(Path::new("..data").join(key), dir.path().join(key)).unwrap();
    }
    dir
}

/// The pod's configuration serving for real: the bundle from its ConfigMap layout, a token
/// shaped like a projected service account token (audience `mandate`, the `kubernetes.io`
/// claims, ten minutes), `/readyz` ready. Only the keys differ from a cluster: the dev key
/// stands in for the API server's (and the listener and data paths move to a temporary place).
#[tokio::test]
async fn kubernetes_configuration_serves_a_projected_token() {
    let mut config = k8s_config();
    let bundle = configmap_volume("mandate-bundle");
    let data = tempfile::tempdir().unwrap();
    config.server.listen = Some("127.0.0.1:0".parse().unwrap());
    config.ext_authz.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    config.policy.bundle = bundle.path().to_owned();
    config.audit.path = data.path().join("audit.jsonl");
    config.store.url = data.path().join("mandate.db").display().to_string();
    let issuer = &mut config.issuers[0];
    issuer.jwks = Some(JwksSource::File(repo().join("config/dev/jwks.json")));
    issuer.algorithms = vec![jsonwebtoken::Algorithm::ES256];
    let iss = issuer.issuer.clone();
    let aud = issuer.audiences[0].clone();

    let server = common::TestServer::start(&config).await;
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    let status = ready.status().as_u16();
    let body: Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(at(&body, "policy.policies"), &json!(14));

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sub = "system:serviceaccount:agents:agent";
    let claims = json!({"kubernetes.io": {
        "namespace": "agents",
        "serviceaccount": {"name": "agent", "uid": "5f1c"},
        "pod": {"name": "agent-7d9f", "uid": "9e2a"}}});
    let key = std::fs::read(repo().join("config/dev/signing-key.pem")).unwrap();
    let token = mandate::identity::dev::mint(
        &key,
        "dev-1",
        &iss,
        &aud,
        sub,
        claims.as_object().unwrap().clone(),
        Duration::from_secs(600),
        now,
    )
    .unwrap();
    let check = json!({"action": "crm:read", "resource": {"type": "CrmRecord", "id": "c-1"}});
    let (status, v) = server.post("/v1/check", Some(&token), &check).await;
    assert_eq!((status, &v["decision"]), (200, &json!("allow")), "{v}");
    server.shutdown().await;
}

/// `kubectl kustomize` (offline) builds both kustomizations, and the generated ConfigMaps'
/// hashed names reach the Deployment. Skipped, saying so, where kubectl is not installed.
#[test]
fn kustomizations_build_where_kubectl_is_installed() {
    let kustomize = |dir: &str| -> Option<Vec<Value>> {
        let out = Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(repo())
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        Some(
            serde_yaml_ng::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).unwrap())
                .collect(),
        )
    };
    let Some(docs) = kustomize("deploy/kubernetes") else {
        eprintln!("kubectl is not installed: the kustomizations were not built (skipped)");
        return;
    };
    let config_maps: BTreeMap<String, &Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| (s(d, "metadata.name").to_owned(), d))
        .collect();
    let deployment = named(&docs, "kind", "Deployment");
    let pod = at(deployment, "spec.template.spec");
    for volume in ["mandate-config", "mandate-bundle"] {
        let name = s(
            named(list(pod, "volumes"), "name", volume),
            "configMap.name",
        );
        assert!(name.starts_with(&format!("{volume}-")), "{name}: hashed");
        assert!(config_maps.contains_key(name), "{name} generated");
    }
    let bundle = config_maps
        .iter()
        .find(|(n, _)| n.starts_with("mandate-bundle-"))
        .unwrap()
        .1;
    assert!(at(bundle, "data").get("schema.cedarschema").is_some());
    let mandate = sidecar(pod);
    let image = s(&mandate, "image");
    assert_eq!(
        image.rsplit(':').next(),
        Some(env!("CARGO_PKG_VERSION")),
        "{image}"
    );
    let istio = kustomize("deploy/istio").unwrap();
    assert_eq!(istio.len(), 2);
}

/// Istio's extension providers as MeshConfig spells them (istio/api mesh/v1alpha1/config.proto).
const ISTIO_HTTP_PROVIDER_FIELDS: &[&str] = &[
    "service",
    "port",
    "timeout",
    "pathPrefix",
    "failOpen",
    "clearRouteCache",
    "statusOnError",
    "includeRequestHeadersInCheck",
    "includeAdditionalHeadersInCheck",
    "includeRequestBodyInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnDeny",
    "headersToDownstreamOnAllow",
];
const ISTIO_GRPC_PROVIDER_FIELDS: &[&str] = &[
    "service",
    "port",
    "timeout",
    "failOpen",
    "clearRouteCache",
    "statusOnError",
    "includeRequestBodyInCheck",
];

/// P-01: Istio asks the Mandate sidecar of the pod being called, over its loopback, and refuses
/// the request when Mandate cannot answer.
#[test]
fn p01_istio_providers_reach_the_sidecar_and_fail_closed() {
    let mesh = yaml("deploy/istio/mesh-config.yaml");
    let providers: BTreeMap<&str, &Value> = list(&mesh, "spec.meshConfig.extensionProviders")
        .iter()
        .map(|p| (s(p, "name"), p))
        .collect();
    let entry = yaml("deploy/istio/service-entry.yaml");
    assert_eq!(s(&entry, "kind"), "ServiceEntry");
    assert_eq!(s(&entry, "spec.resolution"), "STATIC");
    let addresses: Vec<&str> = list(&entry, "spec.endpoints")
        .iter()
        .map(|e| s(e, "address"))
        .collect();
    assert_eq!(addresses, ["127.0.0.1"], "each pod's own sidecar");
    let entry_ports = list(&entry, "spec.ports");
    let service = format!(
        "{}/{}",
        s(&entry, "metadata.namespace"),
        list(&entry, "spec.hosts")[0].as_str().unwrap()
    );
    let port_protocol = |p: &Value| -> String {
        let port = at(p, "port").as_u64().unwrap();
        let found = entry_ports
            .iter()
            .find(|e| at(e, "number").as_u64() == Some(port))
            .unwrap_or_else(|| panic!("port {port} not in the ServiceEntry"));
        s(found, "protocol").to_owned()
    };

    let http = at(providers["mandate-http"], "envoyExtAuthzHttp");
    known_keys(http, "envoyExtAuthzHttp", ISTIO_HTTP_PROVIDER_FIELDS);
    assert_eq!(s(http, "service"), service);
    assert_eq!(
        at(http, "port").as_u64(),
        Some(u64::from(k8s_listen().port()))
    );
    assert_eq!(port_protocol(http), "HTTP");
    assert_eq!(s(http, "pathPrefix"), "/authz/envoy");
    assert_eq!(at(http, "failOpen"), &json!(false), "spelled out, false");
    assert!(duration(s(http, "timeout")) <= EXT_AUTHZ_TIMEOUT);
    assert!(strings(http, "includeRequestHeadersInCheck").contains("authorization"));
    let upstream = strings(http, "headersToUpstreamOnAllow");
    for h in ["x-mandate-decision-id", "x-mandate-principal"] {
        assert!(upstream.contains(h), "{h} on allow");
    }
    let downstream = strings(http, "headersToDownstreamOnDeny");
    for h in ["x-mandate-approval-id", "x-mandate-approval-url"] {
        assert!(downstream.contains(h), "{h} on escalation");
    }

    let grpc = at(providers["mandate-grpc"], "envoyExtAuthzGrpc");
    known_keys(grpc, "envoyExtAuthzGrpc", ISTIO_GRPC_PROVIDER_FIELDS);
    assert_eq!(s(grpc, "service"), service);
    assert_eq!(at(grpc, "port").as_u64(), Some(9191));
    // The pod's Mandate serves it there, on the loopback its Envoy sidecar shares.
    assert_eq!(
        k8s_config().ext_authz.grpc_listen,
        Some("127.0.0.1:9191".parse().unwrap())
    );
    assert_eq!(port_protocol(grpc), "GRPC");
    assert_eq!(at(grpc, "failOpen"), &json!(false));
    assert!(duration(s(grpc, "timeout")) <= EXT_AUTHZ_TIMEOUT);

    // The CUSTOM policy names a defined provider (the one that works today), matches every
    // request, and selects the pods that carry the sidecar.
    let policy = yaml("deploy/istio/authorization-policy.yaml");
    assert_eq!(s(&policy, "kind"), "AuthorizationPolicy");
    assert_eq!(s(&policy, "spec.action"), "CUSTOM");
    assert_eq!(s(&policy, "spec.provider.name"), "mandate-http");
    assert_eq!(list(&policy, "spec.rules"), &[json!({})]);
    assert_eq!(
        s(&policy, "metadata.namespace"),
        s(&entry, "metadata.namespace")
    );
    let labels = pod_labels();
    for (k, v) in at(&policy, "spec.selector.matchLabels")
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(k), Some(v), "the sidecar's pods carry {k}");
    }
}

/// Fields of the ext_authz HTTP filter's config (envoy/extensions/filters/http/ext_authz/v3).
const ENVOY_EXT_AUTHZ_FIELDS: &[&str] = &[
    "@type",
    "grpc_service",
    "http_service",
    "transport_api_version",
    "failure_mode_allow",
    "failure_mode_allow_header_add",
    "with_request_body",
    "clear_route_cache",
    "status_on_error",
    "validate_mutations",
    "metadata_context_namespaces",
    "typed_metadata_context_namespaces",
    "route_metadata_context_namespaces",
    "route_typed_metadata_context_namespaces",
    "filter_enabled",
    "filter_enabled_metadata",
    "deny_at_disable",
    "include_peer_certificate",
    "stat_prefix",
    "bootstrap_metadata_labels_key",
    "allowed_headers",
    "disallowed_headers",
    "include_tls_session",
    "charge_cluster_response_stats",
    "encode_raw_headers",
    "decoder_header_mutation_rules",
    "enable_dynamic_metadata_ingestion",
    "filter_metadata",
    "emit_filter_state_stats",
    "max_denied_response_body_bytes",
    "enforce_response_header_limits",
];

/// The ext_authz filter of an Envoy config (before the router), and its clusters by name.
fn envoy_ext_authz(rel: &str) -> (Value, BTreeMap<String, Value>) {
    let envoy = yaml(rel);
    let listeners = list(&envoy, "static_resources.listeners");
    assert_eq!(listeners.len(), 1);
    let hcm = &list(&listeners[0], "filter_chains.0.filters")[0];
    assert_eq!(
        s(hcm, "name"),
        "envoy.filters.network.http_connection_manager"
    );
    let filters = list(hcm, "typed_config.http_filters");
    let names: Vec<&str> = filters.iter().map(|f| s(f, "name")).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.ext_authz", "envoy.filters.http.router"],
        "ext_authz decides before the router forwards"
    );
    let config = at(&filters[0], "typed_config").clone();
    assert_eq!(
        s(&config, "@type"),
        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
    );
    known_keys(&config, rel, ENVOY_EXT_AUTHZ_FIELDS);
    let clusters = list(&envoy, "static_resources.clusters")
        .iter()
        .map(|c| (s(c, "name").to_owned(), c.clone()))
        .collect();
    (config, clusters)
}

/// The one endpoint of a static cluster.
fn cluster_endpoint(cluster: &Value) -> (String, u64) {
    let endpoints = list(cluster, "load_assignment.endpoints.0.lb_endpoints");
    assert_eq!(endpoints.len(), 1);
    let address = at(&endpoints[0], "endpoint.address.socket_address");
    (
        s(address, "address").to_owned(),
        at(address, "port_value").as_u64().unwrap(),
    )
}

fn exact_patterns(v: &Value, path: &str) -> BTreeSet<String> {
    list(v, path)
        .iter()
        .map(|p| s(p, "exact").to_owned())
        .collect()
}

/// P-01: Envoy refuses the request when Mandate cannot be reached or answer in time, and the
/// HTTP check goes to Mandate's listener on /authz/envoy with the agent's token.
#[test]
fn p01_envoy_http_ext_authz_fails_closed_to_the_sidecar() {
    let (config, clusters) = envoy_ext_authz("deploy/envoy/envoy.yaml");
    assert_eq!(
        at(&config, "failure_mode_allow"),
        &json!(false),
        "spelled out, false"
    );
    let http = at(&config, "http_service");
    let uri = at(http, "server_uri");
    assert!(duration(s(uri, "timeout")) <= EXT_AUTHZ_TIMEOUT);
    let cluster = &clusters[s(uri, "cluster")];
    let (address, port) = cluster_endpoint(cluster);
    assert_eq!(address, "127.0.0.1");
    assert_eq!(port, 8181, "Mandate's default listener");
    assert_eq!(s(uri, "uri"), format!("http://127.0.0.1:{port}"));
    assert_eq!(s(http, "path_prefix"), "/authz/envoy");
    assert!(exact_patterns(&config, "allowed_headers.patterns").contains("authorization"));
    let upstream = exact_patterns(
        http,
        "authorization_response.allowed_upstream_headers.patterns",
    );
    for h in ["x-mandate-decision-id", "x-mandate-principal"] {
        assert!(upstream.contains(h), "{h} on allow");
    }
    let client = exact_patterns(
        http,
        "authorization_response.allowed_client_headers.patterns",
    );
    for h in ["x-mandate-approval-id", "x-mandate-approval-url"] {
        assert!(client.contains(h), "{h} on escalation");
    }
}

/// P-01, gRPC: the same, to the Authorization/Check service on 127.0.0.1:9191 over HTTP/2.
#[test]
fn p01_envoy_grpc_ext_authz_fails_closed_to_port_9191() {
    let (config, clusters) = envoy_ext_authz("deploy/envoy/envoy-grpc.yaml");
    assert_eq!(
        at(&config, "failure_mode_allow"),
        &json!(false),
        "spelled out, false"
    );
    assert_eq!(s(&config, "transport_api_version"), "V3");
    let grpc = at(&config, "grpc_service");
    assert!(duration(s(grpc, "timeout")) <= EXT_AUTHZ_TIMEOUT);
    let cluster = &clusters[s(grpc, "envoy_grpc.cluster_name")];
    assert_eq!(cluster_endpoint(cluster), ("127.0.0.1".to_owned(), 9191));
    // The example configuration serves it there.
    let example = Config::parse(
        &read("config/mandate.toml"),
        &repo().join("config/mandate.toml"),
        &[],
    )
    .unwrap();
    assert_eq!(
        example.ext_authz.grpc_listen,
        Some("127.0.0.1:9191".parse().unwrap())
    );
    // The key holds dots: looked up whole.
    let options = &at(cluster, "typed_extension_protocol_options")["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert_eq!(
        s(options, "@type"),
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    );
    at(options, "explicit_http_config.http2_protocol_options");
    assert!(exact_patterns(&config, "allowed_headers.patterns").contains("authorization"));
}

/// The unit as installed, but starting the binary this test suite built.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = read("deploy/systemd/mandate.service").replace(
        "ExecStart=/usr/local/bin/mandate ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_mandate")),
    );
    assert!(unit.contains(env!("CARGO_BIN_EXE_mandate")));
    let path = dir.join("mandate.service");
    std::fs::write(&path, unit).unwrap();
    path
}

/// `systemd-analyze verify` finds nothing to say about the unit, and `systemd-analyze
/// security` rates its exposure below 2 (of 10). Skipped, saying so, without systemd-analyze.
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = read("deploy/systemd/mandate.service");
    let directives: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let value = |key: &str| -> Vec<&str> {
        directives
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(
        value("ExecStart"),
        ["/usr/local/bin/mandate serve --config /etc/mandate/mandate.toml"]
    );
    assert_eq!(value("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(value("KillSignal"), ["SIGTERM"]);
    assert_eq!(value("StateDirectory"), ["mandate"]);
    for (key, expected) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ] {
        assert_eq!(value(key), [expected], "{key}");
    }
    // The data lands in the state directory, the only place the service may write: the
    // example configuration read with the unit's environment.
    let env: Vec<(String, String)> = value("Environment")
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let path = repo().join("config/mandate.toml");
    let config = Config::parse(&read("config/mandate.toml"), &path, &env).unwrap();
    assert!(config.audit.path.starts_with("/var/lib/mandate"));
    assert!(config.store.url.starts_with("/var/lib/mandate/"));
    assert!(config.log.json);

    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: the unit was not verified (skipped)");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = unit_for_this_build(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Other units of the host may draw warnings of their own: only ours count.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("mandate.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify:\n{}",
        ours.join("\n")
    );
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(score) = text.lines().find_map(|l| {
        l.split("Overall exposure level for mandate.service: ")
            .nth(1)
    }) else {
        eprintln!(
            "systemd-analyze security --offline is not supported here (skipped): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    let score: f64 = score.split_whitespace().next().unwrap().parse().unwrap();
    assert!(score < 2.0, "exposure {score}:\n{text}");
}
