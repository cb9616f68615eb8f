//! The connect flow end to end: a real browser opens a builder's connect link, approves (or
//! denies) at the provider simulator's consent page, chooses objects and lands back in the
//! builder's app; the installation then reads records to the sink. And every way the flow
//! can be abused answers a page with a code and leaves nothing half-made.

use crate::browser::Browser;
use amplog_api::{Keys, Scope, Server, ServerConfig};
use amplog_domain::integration::{Backfill, Manifest, ObjectDecl};
use amplog_domain::operation::OperationStatus;
use amplog_simulator::sim::SimConfig;
use amplog_simulator::testing::SyncWorld;
use serde_json::{json, Value};
use std::time::Duration;

struct Connect {
    world: SyncWorld,
    server: Server,
    base: String,
    admin: String,
    write: String,
    /// The builder's app: where users return to.
    builder: String,
    builder_task: tokio::task::JoinHandle<()>,
    /// No redirects followed: each step's answer is seen as it is.
    http: reqwest::Client,
}

impl Connect {
    async fn start() -> Connect {
        let world = SyncWorld::start(SimConfig { records: 120, ..SimConfig::default() }).await;
        // Revision 2: deals are optional, the user chooses.
        let object = |name: &str, optional| ObjectDecl {
            name: name.into(),
            schedule: Some("@every 15m".into()),
            backfill: Backfill::Full,
            fields: vec!["email".into()],
            destination: None,
            optional,
            subscribe: vec![],
        };
        let manifest = Manifest { objects: vec![object("contacts", false), object("deals", true)] };
        world.service.deploy_revision(&world.ctx, world.integration, &manifest).await.expect("revision 2");
        let keys = Keys::new(&world.service);
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            connectors: world.connectors.clone(),
            egress: amplog_providers::egress::Egress::private(),
            ..ServerConfig::default()
        };
        let server = Server::start(config, world.service.clone(), keys.clone()).await.unwrap();
        let base = format!("http://{}", server.addr);
        let key = |scope| {
            let keys = keys.clone();
            let project = world.ctx.project_id;
            async move { keys.create(project, scope, None).await.unwrap().1 }
        };
        let (admin, write) = (key(Scope::Admin).await, key(Scope::Write).await);
        let app = axum::Router::new()
            .route("/connected", axum::routing::get(|| async { axum::response::Html("<h1>Back in the app</h1>") }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let builder = format!("http://{}", listener.local_addr().unwrap());
        let builder_task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let http =
            amplog_providers::connector::http_client().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Connect { world, server, base, admin, write, builder, builder_task, http }
    }

    async fn gql(&self, key: &str, query: &str, variables: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/graphql", self.base))
            .header("x-api-key", key)
            .json(&json!({"query": query, "variables": variables}))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    async fn provider_app(&self) -> Value {
        let config = SimConfig::default();
        let body = self
            .gql(
                &self.admin,
                "mutation($i: ProviderAppInput!) { createProviderApp(input: $i) {
                    provider clientId secretFingerprint scopes returnUrls } }",
                json!({"i": {"provider": "simulator", "clientId": config.client_id, "clientSecret": config.client_secret,
                             "scopes": ["crm.objects.contacts.read", "crm.objects.deals.read"],
                             "returnUrls": [format!("{}/connected", self.builder)]}}),
            )
            .await;
        body["data"]["createProviderApp"].clone()
    }

    async fn session(&self, group: &str, extra: Value) -> Value {
        let mut input = json!({"integrationId": self.world.integration, "groupRef": group,
                               "consumerRef": format!("{group}-admin")});
        input.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.gql(
            &self.write,
            "mutation($i: ConnectSessionInput!) { createConnectSession(input: $i) { id url expiresAt } }",
            json!({"i": input}),
        )
        .await
    }

    async fn link(&self, group: &str, extra: Value) -> (String, String) {
        let body = self.session(group, extra).await;
        let created = &body["data"]["createConnectSession"];
        assert!(created["url"].is_string(), "{body}");
        (created["id"].as_str().unwrap().to_string(), created["url"].as_str().unwrap().to_string())
    }

    async fn count(&self, aggregate: &str, event: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE project_id = $1 AND aggregate_type = $2 AND event_type = $3",
        )
        .bind(self.world.ctx.project_id.0)
        .bind(aggregate)
        .bind(event)
        .fetch_one(&self.world.db.pool)
        .await
        .unwrap()
    }

    async fn session_state(&self, id: &str) -> Value {
        let body = self
            .gql(
                &self.write,
                "query($id: UUID!) { connectSession(id: $id) { status failures lastFailure connectionId installationId } }",
                json!({"id": id}),
            )
            .await;
        body["data"]["connectSession"].clone()
    }

    async fn stop(self) {
        self.builder_task.abort();
        self.server.stop().await.unwrap();
    }
}

fn code_of(response: &reqwest::Response) -> String {
    response.headers().get("x-amplog-error-code").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Approve in a real browser: the page, the consent, the choice of objects, back in the
/// builder's app; the installation exists as chosen and its first read reaches the sink.
/// Then the used callback, replayed, creates nothing; and a second user denies consent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_connects_in_a_browser_and_the_first_read_arrives() {
    let c = Connect::start().await;
    let app = c.provider_app().await;
    assert_eq!(app["clientId"], "amplog-demo");
    assert!(app["secretFingerprint"].as_str().unwrap().starts_with("sha256:"), "{app}");
    assert!(!app.to_string().contains("amplog-demo-secret"), "the secret is never readable back");
    // The end user cannot pre-fill the ids the return URL reports.
    let return_url = format!("{}/connected?from=amplog&connection_id=forged", c.builder);
    let (session, link) = c.link("globex", json!({"returnUrl": return_url})).await;
    assert!(link.starts_with(&format!("{}/connect/", c.base)), "{link}");
    let connections = c.count("connection", "Created").await;
    let approvals = c.world.sim_stats().await.approvals;

    let browser = Browser::start().await;
    browser.goto(&link).await;
    browser.wait_for("document.querySelector('#connect')").await;
    let page = browser.text().await;
    for expected in [
        "Connect your amplog provider simulator account",
        "crm",
        "contacts",
        "deals (optional)",
        "crm.objects.deals.read",
    ] {
        assert!(page.contains(expected), "{expected:?} in {page}");
    }
    browser.screenshot("1-connect-page").await;
    browser.click("#connect").await;
    browser.wait_for("document.querySelector('#approve')").await;
    assert!(browser.url().await.starts_with(&c.world.sim.url()), "at the provider's consent page");
    assert!(browser.text().await.contains("crm.objects.contacts.read"));
    browser.screenshot("2-consent").await;
    browser.click("#approve").await;
    browser.wait_for("document.querySelector('#done')").await;
    let callback = browser.url().await;
    assert!(callback.starts_with(&format!("{}/v1/oauth/callback?", c.base)), "{callback}");
    browser.screenshot("3-choose-objects").await;
    browser.eval("document.querySelector('input[value=deals]').checked = false; return true").await;
    browser.click("#done").await;
    browser.wait_for("document.body.innerText.includes('Back in the app')").await;
    let back = reqwest::Url::parse(&browser.url().await).unwrap();
    assert!(
        back.as_str().starts_with(&format!("{}/connected?from=amplog&amplog_status=connected", c.builder)),
        "{back}"
    );
    assert!(!back.as_str().contains("forged"), "{back}");
    let query: std::collections::HashMap<String, String> = back.query_pairs().into_owned().collect();
    let installation: uuid::Uuid = query["installation_id"].parse().unwrap();

    // The log: one connection (fingerprint only), the installation as chosen, the session done.
    assert_eq!(c.count("connection", "Created").await, connections + 1);
    let state = c.session_state(&session).await;
    assert_eq!(state["status"], "completed", "{state}");
    assert_eq!(state["installationId"], installation.to_string());
    let ctx = &c.world.ctx;
    let inst =
        c.world.service.load::<amplog_domain::installation::Installation>(ctx, installation).await.unwrap().state;
    assert_eq!((inst.group_ref.as_str(), inst.revision), ("globex", 2));
    assert!(inst.objects["contacts"].enabled && !inst.objects["deals"].enabled, "{:?}", inst.objects);
    let payloads: Vec<String> = sqlx::query_scalar("SELECT payload::text FROM events WHERE project_id = $1")
        .bind(ctx.project_id.0)
        .fetch_all(&c.world.db.pool)
        .await
        .unwrap();
    let stats = c.world.sim_stats().await;
    assert_eq!((stats.approvals, stats.pkce_exchanges), (approvals + 1, 1), "{stats:?}");
    let token = link.rsplit('/').next().unwrap();
    for secret in ["amplog-demo-secret", token] {
        assert!(payloads.iter().all(|p| !p.contains(secret)), "{secret} is in the log");
    }

    // Its first read: records from the simulator at the sink.
    let delivered = c.world.sink.report().distinct_records;
    let new = amplog_commands::testing::read_of("contacts");
    let outcome =
        c.world.service.request_operation(ctx, amplog_domain::InstallationId(installation), &new).await.unwrap();
    let op = amplog_domain::OperationId(outcome.id_of("operation").unwrap());
    let dispatch = c.world.spawn_dispatch("worker-1", Duration::from_secs(60));
    let done = c.world.finished(op, Duration::from_secs(60)).await;
    dispatch.abort();
    assert_eq!((done.status, done.records), (OperationStatus::Succeeded, 120));
    assert!(c.world.sink.report().distinct_records >= delivered + 120);

    // The used callback again, in the same browser: refused, nothing created.
    browser.goto(&callback).await;
    browser.wait_for("document.querySelector('main[data-error-code]')").await;
    let code = browser.eval("return document.querySelector('main').dataset.errorCode").await;
    assert_eq!(code, "already_completed");
    // And from another browser (no cookie): not its attempt.
    let replay = c.http.get(&callback).send().await.unwrap();
    assert_eq!((replay.status().as_u16(), code_of(&replay).as_str()), (409, "already_completed"));
    assert_eq!(c.count("connection", "Created").await, connections + 1);
    assert_eq!(c.count("installation", "Created").await, 2);

    // A second user denies consent: a clear page, the session can be tried again, nothing made.
    let (denied, link) = c.link("initech", json!({})).await;
    browser.goto(&link).await;
    browser.click("#connect").await;
    browser.click("#deny").await;
    browser.wait_for("document.querySelector('main[data-error-code]')").await;
    assert_eq!(browser.eval("return document.querySelector('main').dataset.errorCode").await, "access_denied");
    assert!(browser.text().await.contains("Access was not granted"));
    browser.screenshot("4-denied").await;
    let state = c.session_state(&denied).await;
    assert_eq!((state["status"].as_str(), state["failures"].as_i64()), (Some("open"), Some(1)), "{state}");
    assert_eq!(state["lastFailure"], "access_denied");
    assert_eq!(c.count("connection", "Created").await, connections + 1);
    // "Try again" goes back to the link.
    browser.click("#retry").await;
    browser.wait_for("document.querySelector('#connect')").await;
    browser.quit().await;
    c.stop().await;
}

/// Steps through the flow over plain HTTP, carrying the cookie by hand: returns the
/// consent-approved callback URL and the cookie.
async fn approve(c: &Connect, link: &str) -> (String, String) {
    let start = c.http.post(link).send().await.unwrap();
    assert_eq!(start.status(), 303, "{}", start.text().await.unwrap());
    let cookie = start.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let consent = start.headers()["location"].to_str().unwrap().to_string();
    assert!(consent.contains("code_challenge_method=S256"), "{consent}");
    let form: Vec<(String, String)> = reqwest::Url::parse(&consent).unwrap().query_pairs().into_owned().collect();
    let mut form = form;
    form.push(("decision".into(), "approve".into()));
    let decided = c.http.post(format!("{}/oauth/authorize", c.world.sim.url())).form(&form).send().await.unwrap();
    (decided.headers()["location"].to_str().unwrap().to_string(), cookie)
}

/// Everything a hostile or careless caller can send: forged links and states, another
/// site's form, a return URL off the allow-list, a missing provider app, a replayed code
/// from another browser. Each answers a page or an error with a code; no connection appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_misconfigured_connect_requests_create_nothing() {
    let c = Connect::start().await;
    // No provider app yet: a session cannot be made.
    let body = c.session("globex", json!({})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "provider_app.not_found", "{body}");
    // Only an admin key configures apps; bad configurations are refused with codes.
    let input = |urls: Value| json!({"i": {"provider": "simulator", "clientId": "amplog-demo", "clientSecret": "s", "returnUrls": urls}});
    let create = "mutation($i: ProviderAppInput!) { createProviderApp(input: $i) { provider } }";
    let body = c.gql(&c.write, create, input(json!([]))).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "forbidden", "{body}");
    for (urls, code) in [
        (json!(["http://app.example/cb"]), "provider_app.invalid_return_url"),
        (json!(["https://app.example/cb#x"]), "provider_app.invalid_return_url"),
        (json!(["not a url"]), "provider_app.invalid_return_url"),
    ] {
        let body = c.gql(&c.admin, create, input(urls)).await;
        assert_eq!(body["errors"][0]["extensions"]["code"], code, "{body}");
    }
    let body = c.gql(&c.admin, create, json!({"i": {"provider": "nope", "clientId": "a", "clientSecret": "s"}})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_input", "{body}");
    c.provider_app().await;
    let body = c.gql(&c.admin, create, input(json!([]))).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "provider_app.already_exists", "{body}");
    // An update without a secret keeps the stored one.
    let fingerprint = |body: &Value| body["data"]["updateProviderApp"]["secretFingerprint"].clone();
    let update = "mutation($i: ProviderAppInput!) { updateProviderApp(input: $i) { secretFingerprint returnUrls } }";
    let before = c.gql(&c.admin, "{ providerApps { provider secretFingerprint } }", json!({})).await;
    let updated = c
        .gql(
            &c.admin,
            update,
            json!({"i": {"provider": "simulator", "clientId": "amplog-demo",
            "returnUrls": [format!("{}/connected", c.builder)]}}),
        )
        .await;
    assert_eq!(fingerprint(&updated), before["data"]["providerApps"][0]["secretFingerprint"], "{updated}");

    // Return URLs off the allow-list, however close.
    for url in [
        "https://evil.example/connected".to_string(),
        format!("{}/connected/../admin", c.builder.replace("127.0.0.1", "localhost")),
        format!("{}/connectedx", c.builder),
        format!("{}@evil.example/connected", c.builder),
    ] {
        let body = c.session("globex", json!({"returnUrl": url})).await;
        assert_eq!(body["errors"][0]["extensions"]["code"], "connect_session.return_url_not_allowed", "{url}: {body}");
    }
    let long = format!("{}/connected?q={}", c.builder, "x".repeat(3_000));
    let body = c.session("globex", json!({"returnUrl": long})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_input", "{body}");
    for minutes in [0, 1441] {
        let body = c.session("globex", json!({"expiresInMinutes": minutes})).await;
        assert_eq!(body["errors"][0]["extensions"]["code"], "invalid_input", "{body}");
    }
    // Another project's connection cannot be reconnected from here: it does not exist.
    let body = c.session("globex", json!({"connectionId": uuid::Uuid::now_v7()})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "not_found", "{body}");
    let body = c.session("someone-else", json!({"connectionId": c.world.connection.0})).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "not_found", "a connection of another group: {body}");

    let connections = c.count("connection", "Created").await;
    let (_, link) = c.link("globex", json!({})).await;
    let token = link.rsplit('/').next().unwrap().to_string();
    // Forged links: garbage, too long, right ids with the wrong secret.
    let mut wrong = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &token).unwrap();
    wrong[40] ^= 1;
    let wrong = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, wrong);
    for forged in ["garbage".to_string(), "A".repeat(5000), wrong] {
        let response = c.http.get(format!("{}/connect/{forged}", c.base)).send().await.unwrap();
        assert_eq!((response.status().as_u16(), code_of(&response).as_str()), (404, "link_invalid"));
    }
    // The real page: strict headers.
    let page = c.http.get(&link).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors") && csp.contains("form-action 'self'"),
        "{csp}"
    );
    assert_eq!(page.headers()["referrer-policy"], "same-origin");
    assert_eq!(page.headers()["cache-control"], "no-store");
    // Another site's form cannot start it.
    let response = c.http.post(&link).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!((response.status().as_u16(), code_of(&response).as_str()), (403, "cross_site"));
    // Forged states.
    for state in ["x", &"A".repeat(64), &"B".repeat(300)] {
        let response = c.http.get(format!("{}/v1/oauth/callback?state={state}&code=abc", c.base)).send().await.unwrap();
        assert_eq!((response.status().as_u16(), code_of(&response).as_str()), (400, "state_invalid"), "{state}");
    }
    // A real callback presented by a browser that did not start it: refused before the
    // code is spent; the starting browser then completes.
    let (callback, cookie) = approve(&c, &link).await;
    let stolen = c.http.get(&callback).send().await.unwrap();
    assert_eq!((stolen.status().as_u16(), code_of(&stolen).as_str()), (400, "state_mismatch"));
    let wrong_cookie = c.http.get(&callback).header("cookie", cookie.replacen('=', "=x", 1)).send().await.unwrap();
    assert_eq!(code_of(&wrong_cookie), "state_mismatch");
    assert_eq!(c.count("connection", "Created").await, connections);
    let choose = c.http.get(&callback).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(choose.status(), 200);
    assert_eq!(c.count("connection", "Created").await, connections + 1);
    // The same callback again (a reload): the choice again, no code spent, no second connection.
    let again = c.http.get(&callback).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.text().await.unwrap().contains("Choose what to share"));
    assert_eq!(c.count("connection", "Created").await, connections + 1);
    // A finish from another site, or without the cookie, does nothing.
    let state =
        reqwest::Url::parse(&callback).unwrap().query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let finish = format!("{}/v1/oauth/finish", c.base);
    let cross = c
        .http
        .post(&finish)
        .header("origin", "https://evil.example")
        .header("cookie", &cookie)
        .form(&[("state", &state)])
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(&cross), "cross_site");
    let bare = c.http.post(&finish).form(&[("state", &state)]).send().await.unwrap();
    assert_eq!(code_of(&bare), "state_mismatch");
    assert_eq!(c.count("installation", "Created").await, 1);
    let done = c
        .http
        .post(&finish)
        .header("cookie", &cookie)
        .form(&[("state", state.as_str()), ("object", "deals")])
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let page = done.text().await.unwrap();
    assert!(page.contains("window.opener.postMessage") && page.contains("amplog:connected"), "{page}");
    assert_eq!(c.count("installation", "Created").await, 2);

    // The provider app deleted: the next link's page says so, and nothing starts.
    let (_, link) = c.link("hooli", json!({})).await;
    let body = c.gql(&c.admin, "mutation { deleteProviderApp(provider: \"simulator\") { id } }", json!({})).await;
    assert!(body["errors"].is_null(), "{body}");
    let page = c.http.get(&link).send().await.unwrap();
    assert_eq!((page.status().as_u16(), code_of(&page).as_str()), (409, "provider_app_missing"));
    let start = c.http.post(&link).send().await.unwrap();
    assert_eq!(code_of(&start), "provider_app_missing");
    assert_eq!(c.count("connect_session", "AuthorizationStarted").await, 1);
    c.stop().await;
}

/// A connection that turned `bad_credentials` is reconnected through the connect page
/// (`Reconnected`, same connection), and its reads resume from the recorded watermark.
/// `revokeConnection` then ends it at the provider and in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_credentials_connection_is_reconnected_through_the_page_and_reads_resume() {
    let c = Connect::start().await;
    c.provider_app().await;
    let read = |object: &'static str| {
        let world = &c.world;
        async move {
            let op = world.request_read(object).await;
            let dispatch = world.spawn_dispatch("worker-1", Duration::from_secs(60));
            let state = world.finished(op, Duration::from_secs(60)).await;
            dispatch.abort();
            state
        }
    };
    assert_eq!(read("contacts").await.status, OperationStatus::Succeeded);
    // The customer's grant is revoked at the provider: the next read turns the connection bad.
    c.world.sim_control(&format!("/_sim/revoke/{}", c.world.customer), None).await;
    let failed = read("contacts").await;
    assert_eq!(failed.status, OperationStatus::Failed);
    let ctx = &c.world.ctx;
    let connection =
        c.world.service.load::<amplog_domain::connection::Connection>(ctx, c.world.connection.0).await.unwrap().state;
    assert_eq!(connection.status, amplog_domain::connection::ConnectionStatus::BadCredentials);

    let (session, link) = c.link(&c.world.customer, json!({"connectionId": c.world.connection.0})).await;
    let (callback, cookie) = approve(&c, &link).await;
    let done = c.http.get(&callback).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(done.status(), 200, "reconnecting completes at once");
    assert_eq!(c.count("connection", "Reconnected").await, 1);
    assert_eq!(c.count("connection", "Created").await, 1, "the same connection, not a new one");
    let state = c.session_state(&session).await;
    assert_eq!((state["status"].as_str(), state["installationId"].is_null()), (Some("completed"), true), "{state}");

    // Reads resume from the watermark: only what changed since arrives (the three touched,
    // and the record at the watermark itself: the filter is inclusive, delivery at least once).
    c.world.sim_control("/_sim/touch/contacts/3", None).await;
    c.world.project().await;
    let resumed = read("contacts").await;
    assert_eq!(resumed.status, OperationStatus::Succeeded);
    assert!((3..=4).contains(&resumed.records), "{} of 120 records read again", resumed.records);

    // Revoked: at the provider (RFC 7009) and in the log; reads stop with the reason.
    let revoked_before = c.world.sim_stats().await.revocations;
    let body = c
        .gql(&c.write, "mutation($id: UUID!) { revokeConnection(id: $id) { id } }", json!({"id": c.world.connection.0}))
        .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(c.world.sim_stats().await.revocations, revoked_before + 1);
    let refused = c
        .world
        .service
        .request_operation(ctx, c.world.installation, &amplog_commands::testing::read_of("contacts"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "installation.connection_revoked");
    c.stop().await;
}

/// Every configuration change is an event of the log, in order, with its actor: API keys
/// made and revoked, destinations, the provider app and its update, a connect session's
/// steps. `projectHistory` and the NDJSON export show the same events, no secret is in
/// them, and the chains verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_history_shows_every_configuration_change_with_its_actor() {
    let c = Connect::start().await;
    let keys = Keys::new(&c.world.service);
    let (revoked, _) = keys.create(c.world.ctx.project_id, Scope::Read, Some("short-lived")).await.unwrap();
    assert!(keys.revoke(revoked).await.unwrap());
    assert!(!keys.revoke(revoked).await.unwrap(), "a second revocation records nothing");
    c.provider_app().await;
    let update = "mutation($i: ProviderAppInput!) { updateProviderApp(input: $i) { clientId } }";
    let body = c
        .gql(
            &c.admin,
            update,
            json!({"i": {"provider": "simulator", "clientId": "amplog-demo", "clientSecret": SimConfig::default().client_secret,
            "returnUrls": [format!("{}/connected", c.builder)]}}),
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let body = c
        .gql(
            &c.admin,
            "mutation { createDestination(name: \"crm\", url: \"http://127.0.0.1:9/hooks\") { signingSecret } }",
            json!({}),
        )
        .await;
    let signing = body["data"]["createDestination"]["signingSecret"].as_str().unwrap_or_default().to_string();
    let (_, link) = c.link("globex", json!({})).await;
    let (callback, cookie) = approve(&c, &link).await;
    let choose = c.http.get(&callback).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(choose.status(), 200);

    let query = "query($after: String) { projectHistory(first: 4, after: $after) {
        events { aggregateType eventType actor payload } endCursor hasNextPage } }";
    let mut events = Vec::new();
    let mut after = Value::Null;
    for _ in 0..20 {
        let body = c.gql(&c.admin, query, json!({"after": after})).await;
        let page = &body["data"]["projectHistory"];
        events.extend(page["events"].as_array().unwrap_or_else(|| panic!("{body}")).iter().cloned());
        if page["hasNextPage"] != true {
            break;
        }
        after = page["endCursor"].clone();
    }
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                format!("{}.{}", e["aggregateType"].as_str().unwrap(), e["eventType"].as_str().unwrap()),
                e["actor"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "project.Created",
            "project.DestinationPut",
            "project.ApiKeyCreated",
            "project.ApiKeyCreated",
            "project.ApiKeyCreated",
            "project.ApiKeyRevoked",
            "provider_app.Created",
            "provider_app.Updated",
            "project.DestinationPut",
            "connect_session.Created",
            "connect_session.AuthorizationStarted",
            "connect_session.Connected",
        ],
        "{seen:?}"
    );
    let actor = |i: usize| seen[i].1.as_str();
    assert_eq!((actor(0), actor(2), actor(5)), ("test", "operator", "operator"));
    assert!(actor(6).starts_with("api_key:") && actor(9).starts_with("api_key:"), "{seen:?}");
    assert!(actor(10).starts_with("connect_session:"), "{seen:?}");
    let text = serde_json::to_string(&events).unwrap();
    let token = link.rsplit('/').next().unwrap();
    for secret in
        ["amplog-demo-secret", "rotated-secret", signing.as_str(), token, amplog_simulator::testing::SINK_SECRET]
    {
        assert!(!secret.is_empty() && !text.contains(secret), "a secret in the history: {secret}");
    }
    // The NDJSON export: the same events.
    let export =
        c.http.get(format!("{}/v1/audit/project/events", c.base)).header("x-api-key", &c.admin).send().await.unwrap();
    assert_eq!(export.headers()["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let exported: Vec<String> = lines
        .iter()
        .map(|l| format!("{}.{}", l["aggregate_type"].as_str().unwrap(), l["event_type"].as_str().unwrap()))
        .collect();
    assert_eq!(exported, kinds);
    // The chains verify.
    let mut conn = c.world.db.pool.acquire().await.unwrap();
    let report = amplog_log::audit::verify(&mut conn, None, |_| {}).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    c.stop().await;
}
