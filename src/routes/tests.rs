use serde_json::json;

use super::*;

fn spec(name: &str, method: &str, path: &str, action: &str, resource: (&str, &str)) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        host: None,
        methods: vec![method.into()],
        path: path.into(),
        action: action.into(),
        resource_type: resource.0.into(),
        resource_id: resource.1.into(),
        context: Vec::new(),
    }
}

fn transfer() -> RouteSpec {
    RouteSpec {
        context: vec![("amount".into(), "body:/amount".into())],
        ..spec(
            "transfer",
            "POST",
            "/accounts/{id}/transfers",
            "payments:transfer",
            ("Account", "{id}"),
        )
    }
}

fn compile(s: &RouteSpec) -> Route {
    Route::compile(s).expect("compiles")
}

/// The keys and messages of a spec's problems.
fn problems(s: &RouteSpec) -> Vec<(String, String)> {
    Route::compile(s)
        .expect_err("refused")
        .into_iter()
        .map(|p| (p.key, p.message))
        .collect()
}

fn routes(specs: &[RouteSpec], default: Option<DefaultRoute>) -> Routes {
    Routes::new(specs.iter().map(compile).collect(), default)
}

fn no_inputs(headers: &Vec<(String, String)>) -> Inputs<'_> {
    Inputs {
        headers,
        query: None,
        body: None,
        extensions: None,
    }
}

/// The name of the rule `method path` matches (`default`, or `none`).
fn matched(r: &Routes, method: &str, host: Option<&str>, path: &str) -> String {
    match r.find(method, host, path).expect("routable").matched {
        Matched::Rule { route, .. } => route.name().to_owned(),
        Matched::Default(_) => "default".into(),
        Matched::None => "none".into(),
    }
}

#[test]
fn first_matching_rule_wins_in_the_order_written() {
    let r = routes(
        &[
            spec("one", "GET", "/accounts/me", "a", ("T", "me")),
            spec("two", "GET", "/accounts/{id}", "a", ("T", "{id}")),
            transfer(),
        ],
        None,
    );
    assert_eq!(matched(&r, "GET", None, "/accounts/me"), "one");
    assert_eq!(matched(&r, "GET", None, "/accounts/acct-1"), "two");
    assert_eq!(
        matched(&r, "POST", None, "/accounts/acct-1/transfers"),
        "transfer"
    );
    // Methods are case-sensitive; a segment more or less is another path.
    assert_eq!(
        matched(&r, "post", None, "/accounts/acct-1/transfers"),
        "none"
    );
    assert_eq!(
        matched(&r, "GET", None, "/accounts/acct-1/transfers"),
        "none"
    );
    assert_eq!(matched(&r, "GET", None, "/accounts"), "none");
}

#[test]
fn any_method_and_a_list_of_methods() {
    let any = spec("any", "*", "/x", "a", ("T", "x"));
    let list = RouteSpec {
        methods: vec!["GET".into(), "HEAD".into()],
        ..spec("list", "GET", "/y", "a", ("T", "y"))
    };
    let r = routes(&[any, list], None);
    assert_eq!(matched(&r, "DELETE", None, "/x"), "any");
    assert_eq!(matched(&r, "HEAD", None, "/y"), "list");
    assert_eq!(matched(&r, "POST", None, "/y"), "none");
}

#[test]
fn hosts_exact_with_or_without_port_and_wildcard() {
    let on = |host: &str, name: &str| RouteSpec {
        host: Some(host.into()),
        ..spec(name, "GET", "/", "a", ("T", "root"))
    };
    let r = routes(
        &[
            on("API.example.com", "exact"),
            on("admin.example.com:8443", "port"),
            on("*.example.org", "wild"),
        ],
        None,
    );
    assert_eq!(matched(&r, "GET", Some("api.example.com"), "/"), "exact");
    assert_eq!(
        matched(&r, "GET", Some("api.EXAMPLE.com.:80"), "/"),
        "exact"
    );
    assert_eq!(
        matched(&r, "GET", Some("admin.example.com:8443"), "/"),
        "port"
    );
    assert_eq!(
        matched(&r, "GET", Some("admin.example.com:443"), "/"),
        "none"
    );
    assert_eq!(matched(&r, "GET", Some("a.b.example.org"), "/"), "wild");
    // The bare domain is not one of its subdomains; no host matches no host rule.
    assert_eq!(matched(&r, "GET", Some("example.org"), "/"), "none");
    assert_eq!(matched(&r, "GET", Some("evilexample.org"), "/"), "none");
    assert_eq!(matched(&r, "GET", None, "/"), "none");
}

/// An encoded literal is the literal: otherwise `/acc%6Funts/…` would miss the transfer
/// rule and fall to a broader default while the upstream decodes it to `/accounts/…`.
#[test]
fn segments_are_compared_decoded_and_one_trailing_slash_is_no_slash() {
    let r = routes(&[transfer()], None);
    assert_eq!(
        matched(&r, "POST", None, "/acc%6Funts/acct-1/transfers"),
        "transfer"
    );
    assert_eq!(
        matched(&r, "POST", None, "/accounts/acct-1/transfers/"),
        "transfer"
    );
    let m = r
        .find("POST", None, "/accounts/acct%201/transfers")
        .expect("routable");
    let routed = m.resolve(&no_inputs(&Vec::new())).expect("resolves");
    assert_eq!(routed.resource.id, "acct 1");
}

#[test]
fn paths_read_two_ways_are_refused() {
    let r = routes(&[transfer()], None);
    for path in [
        "accounts/acct-1/transfers",
        "//accounts/acct-1/transfers",
        "/accounts//transfers",
        "/accounts/../admin",
        "/accounts/./acct-1",
        "/accounts/%2e%2E/admin",
        "/accounts/a%2Fb/transfers",
        "/accounts/a%5cb/transfers",
        "/accounts/a\\b/transfers",
        "/accounts/%zz/transfers",
        "/accounts/%e9/transfers",
        "/accounts/a%00/transfers",
        "/accounts/a%0a/transfers",
    ] {
        let e = r.find("POST", None, path).expect_err(path);
        assert!(matches!(e, RouteError::Path { .. }), "{path}: {e}");
        assert_eq!(e.field(), "path");
    }
}

#[test]
fn rest_parameter_takes_the_remaining_segments() {
    let files = spec("files", "GET", "/files/{path*}", "a", ("File", "{path}"));
    let r = routes(&[files], None);
    let m = r.find("GET", None, "/files/a/b%20c/d").expect("routable");
    assert_eq!(
        m.resolve(&no_inputs(&Vec::new()))
            .expect("resolves")
            .resource
            .id,
        "a/b c/d"
    );
    assert_eq!(matched(&r, "GET", None, "/files"), "none");
}

#[test]
fn context_from_each_source_with_numbers_and_absent_values_left_out() {
    let s = RouteSpec {
        context: vec![
            ("account".into(), "path:id".into()),
            ("amount".into(), "body:/amount".into()),
            ("memo".into(), "body:/details/memo".into()),
            ("currency".into(), "header:X-Currency".into()),
            ("limit".into(), "query:limit:number".into()),
            ("label".into(), "query:label".into()),
            ("tenant".into(), "ext:tenant".into()),
            ("absent".into(), "header:x-absent".into()),
        ],
        ..transfer()
    };
    let r = routes(&[s], None);
    let m = r
        .find("POST", None, "/accounts/acct-1/transfers")
        .expect("routable");
    assert!(m.reads_body());
    let headers = vec![("x-currency".to_owned(), "EUR".to_owned())];
    let body = json!({"amount": 250, "details": {"memo": ["a"]}});
    let ext = HashMap::from([("tenant".to_owned(), "t-1".to_owned())]);
    let routed = m
        .resolve(&Inputs {
            headers: &headers,
            query: Some("limit=-5&label=a+b%21&other=%41"),
            body: Some(&body),
            extensions: Some(&ext),
        })
        .expect("resolves");
    assert_eq!(routed.action, "payments:transfer");
    assert_eq!(
        routed.resource,
        RoutedResource {
            kind: "Account".into(),
            id: "acct-1".into()
        }
    );
    assert_eq!(
        Value::Object(routed.context),
        json!({"account": "acct-1", "amount": 250, "memo": ["a"], "currency": "EUR",
               "limit": -5, "label": "a b!", "tenant": "t-1"})
    );
}

/// HTTP parameter pollution: two values of what a rule reads, and the upstream may read the
/// other one. A key that only decodes to the name counts too.
#[test]
fn repeated_headers_or_query_parameters_are_refused_not_picked() {
    let s = RouteSpec {
        context: vec![
            ("amount".into(), "query:amount:number".into()),
            ("currency".into(), "header:x-currency".into()),
        ],
        ..transfer()
    };
    let r = routes(&[s], None);
    let m = r
        .find("POST", None, "/accounts/acct-1/transfers")
        .expect("routable");
    let resolve = |query: &str, headers: &Vec<(String, String)>| {
        m.resolve(&Inputs {
            headers,
            query: Some(query),
            body: None,
            extensions: None,
        })
    };
    let one = vec![("x-currency".to_owned(), "EUR".to_owned())];
    let two = vec![
        ("x-currency".to_owned(), "EUR".to_owned()),
        ("X-Currency".to_owned(), "USD".to_owned()),
    ];
    assert!(resolve("amount=5", &one).is_ok());
    assert_eq!(
        resolve("amount=5&am%6Funt=5000", &one),
        Err(RouteError::RepeatedQuery("amount".into()))
    );
    assert_eq!(
        resolve("amount=5", &two),
        Err(RouteError::RepeatedHeader("x-currency".into()))
    );
    assert_eq!(resolve("amount=%zz", &one), Err(RouteError::QueryEncoding));
    let e = resolve("amount=5.5", &one).expect_err("not an integer");
    assert_eq!(e.field(), "context.amount");
    assert!(e.to_string().contains("query:amount:number"), "{e}");
}

#[test]
fn unmatched_requests_take_the_default_or_none() {
    let default = DefaultRoute {
        action: "http:request".into(),
        resource_type: "Path".into(),
    };
    let r = routes(&[transfer()], Some(default));
    let m = r.find("GET", None, "/other/p%61th/").expect("routable");
    assert!(matches!(m.matched, Matched::Default(_)));
    let routed = m.resolve(&no_inputs(&Vec::new())).expect("resolves");
    assert_eq!(
        (
            routed.action.as_str(),
            routed.resource.kind.as_str(),
            routed.resource.id.as_str()
        ),
        ("http:request", "Path", "/other/path")
    );
    assert_eq!(Value::Object(routed.context), json!({"method": "GET"}));

    let none = routes(&[transfer()], None);
    let m = none.find("DELETE", None, "/other").expect("routable");
    assert!(matches!(m.matched, Matched::None));
    let routed = m.resolve(&no_inputs(&Vec::new())).expect("resolves");
    assert_eq!(
        (routed.action.as_str(), routed.resource.kind.as_str()),
        ("http:DELETE", UNROUTED_RESOURCE_TYPE)
    );
}

#[test]
fn bad_templates_are_refused_at_load_naming_the_key() {
    for (path, wanted) in [
        ("accounts/{id}", "must start with `/`"),
        ("/accounts//x", "empty segment"),
        ("/accounts/", "empty segment"),
        ("/accounts/{id}/{id}", "appears twice"),
        ("/files/{rest*}/x", "must be the last segment"),
        ("/a{id}", "a literal has no"),
        ("/{1d}", "a parameter is"),
        ("/a/../b", "no `.` or `..`"),
        ("/caf%C3%A9", "a literal has no"),
    ] {
        let s = spec("r", "GET", path, "a", ("T", "x"));
        let got = problems(&s);
        assert_eq!(got.len(), 1, "{path}: {got:?}");
        assert_eq!(got[0].0, "path");
        assert!(got[0].1.contains(wanted), "{path}: {}", got[0].1);
    }
}

#[test]
fn bad_methods_hosts_ids_and_sources_are_each_reported() {
    let s = RouteSpec {
        host: Some("exa mple.com".into()),
        methods: vec!["GET".into(), "post".into()],
        context: vec![
            ("mandate".into(), "header:x".into()),
            ("a".into(), "path:nope".into()),
            ("b".into(), "cookie:sid".into()),
            ("c".into(), "body:amount".into()),
            ("d".into(), "body:/amount:number".into()),
            ("e".into(), "header:bad header".into()),
            ("f".into(), "query:".into()),
            ("g".into(), "body:/a~2".into()),
            ("h".into(), "nosource".into()),
        ],
        ..spec("r", "GET", "/accounts/{id}", "a", ("T", "{account}"))
    };
    let keys: Vec<String> = problems(&s).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "host",
            "method[1]",
            "resource.id",
            "context.mandate",
            "context.a",
            "context.b",
            "context.c",
            "context.d",
            "context.e",
            "context.f",
            "context.g",
            "context.h"
        ]
    );
    let any_and_more = RouteSpec {
        methods: vec!["*".into(), "GET".into()],
        ..spec("r", "GET", "/", "a", ("T", "x"))
    };
    assert_eq!(problems(&any_and_more)[0].0, "method");
    let empty = RouteSpec {
        methods: Vec::new(),
        ..spec("", "GET", "/", "", ("", ""))
    };
    let keys: Vec<String> = problems(&empty).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        ["name", "action", "resource.type", "resource.id", "method"]
    );
}

fn example_bundle() -> Bundle {
    Bundle::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies"))
        .expect("example bundle")
}

#[test]
fn routes_are_checked_against_the_bundle_schema() {
    let bundle = example_bundle();
    let ok = routes(&[transfer()], None);
    assert_eq!(ok.check_schema(&bundle), Vec::new());
    let bad = routes(
        &[
            transfer(),
            spec("typo", "GET", "/x", "payments:transfr", ("Account", "x")),
            spec("type", "GET", "/y", "crm:read", ("Acount", "y")),
            spec("wrong", "GET", "/z", "crm:read", ("Account", "z")),
        ],
        Some(DefaultRoute {
            action: "http:request".into(),
            resource_type: "Tool".into(),
        }),
    );
    let got: Vec<(Option<usize>, &str)> = bad
        .check_schema(&bundle)
        .iter()
        .map(|p| (p.rule, p.key))
        .collect();
    assert_eq!(
        got,
        [
            (Some(1), "action"),
            (Some(2), "resource.type"),
            (Some(3), "resource.type"),
            (None, "default_action"),
        ]
    );
    let messages: Vec<String> = bad
        .check_schema(&bundle)
        .into_iter()
        .map(|p| p.message)
        .collect();
    assert!(
        messages[0].contains("`payments:transfr` is not declared"),
        "{}",
        messages[0]
    );
    assert!(
        messages[2].contains("does not apply to `Account`"),
        "{}",
        messages[2]
    );
    assert!(messages[2].contains("CrmRecord"), "{}", messages[2]);
}
