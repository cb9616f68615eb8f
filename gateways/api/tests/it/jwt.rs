//! End users' tokens: a project's backend signs a JWT with a registered public key, and its
//! holder sees and acts on its group's objects only. Group A's token against every kind of
//! group B object — by id, in lists, nested, in mutations — answers exactly like a missing
//! id; forged, expired, unsigned and wrongly signed tokens are refused.

use amplog_api::testing::{error_code, TestApp, TestProject};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A key pair from openssl (Debian's): the private key in PKCS#8 PEM, the public in SPKI.
pub(crate) fn key_pair(kind: &[&str]) -> (String, String) {
    let private = std::process::Command::new("openssl").args(["genpkey"]).args(kind).output().expect("openssl genpkey");
    assert!(private.status.success(), "{}", String::from_utf8_lossy(&private.stderr));
    let mut public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    public.stdin.take().unwrap().write_all(&private.stdout).unwrap();
    let public = public.wait_with_output().unwrap();
    (String::from_utf8(private.stdout).unwrap(), String::from_utf8(public.stdout).unwrap())
}

/// The body of a GraphQL request's answer.
async fn ask(app: &TestApp, key: &str, query: &str, variables: Value) -> Value {
    app.gql(key, query, variables).await.1
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

impl Signer {
    fn token(&self, claims: Value) -> String {
        let header = Header { kid: Some(self.kid.clone()), ..Header::new(self.alg) };
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    fn for_group(&self, group: &str) -> String {
        self.token(json!({"group_ref": group, "consumer_ref": format!("{group}-user"), "exp": now() + 300}))
    }
}

async fn register(app: &TestApp, p: &TestProject, alg: &str, public: &str) -> String {
    let data = app
        .data(
            &p.admin,
            "mutation($a: String!, $k: String!) { createJwtKey(algorithm: $a, publicKey: $k) { kid algorithm } }",
            json!({"a": alg, "k": public}),
        )
        .await;
    data["createJwtKey"]["kid"].as_str().unwrap().to_string()
}

/// Declares an integration, and for each group a connection, an installation and a read.
async fn groups(app: &TestApp, p: &TestProject) -> (String, Vec<(String, String, String)>) {
    let data = app
        .data(
            &p.admin,
            "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }",
            json!({"m": crate::api::MANIFEST}),
        )
        .await;
    let integration = data["declareIntegrations"][0]["id"].as_str().unwrap().to_string();
    let mut out = Vec::new();
    for group in ["group-a", "group-b"] {
        let data = app
            .data(
                &p.write,
                "mutation($i: CreateConnectionInput!) { createConnection(input: $i) { id } }",
                json!({"i": {"integrationId": integration, "groupRef": group, "credentials": {"access_token": "t"}}}),
            )
            .await;
        let connection = data["createConnection"]["id"].as_str().unwrap().to_string();
        let data = app
            .data(
                &p.write,
                "mutation($i: CreateInstallationInput!) { createInstallation(input: $i) { id } }",
                json!({"i": {"integrationId": integration, "connectionId": connection, "groupRef": group, "consumerRef": "c"}}),
            )
            .await;
        let installation = data["createInstallation"]["id"].as_str().unwrap().to_string();
        let data = app
            .data(
                &p.write,
                "mutation($id: UUID!) { triggerRead(installationId: $id, objects: [\"contacts\"], waitForVisibility: true) { id } }",
                json!({"id": installation}),
            )
            .await;
        let operation = data["triggerRead"][0]["id"].as_str().unwrap().to_string();
        out.push((connection, installation, operation));
    }
    (integration, out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_groups_token_sees_and_acts_on_its_group_only() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let (private, public) = key_pair(&["-algorithm", "ed25519"]);
    let kid = register(&app, &p, "EdDSA", &public).await;
    let signer = Signer { kid, alg: Algorithm::EdDSA, key: EncodingKey::from_ed_pem(private.as_bytes()).unwrap() };
    let (integration, objects) = groups(&app, &p).await;
    let (a, b) = (&objects[0], &objects[1]);
    let token = signer.for_group("group-a");

    let data = app.data(&token, "{ viewer { scope groupRef consumerRef } }", json!({})).await;
    assert_eq!(data["viewer"], json!({"scope": "write", "groupRef": "group-a", "consumerRef": "group-a-user"}));
    // Lists hold group A's objects only.
    let data = app
        .data(
            &token,
            "{ installations(first: 50) { nodes { id groupRef connection { id } operations(first: 10) { nodes { id } } } }
               operations(first: 50) { nodes { id installationId } } }",
            json!({}),
        )
        .await;
    let ids = |list: &str| -> Vec<String> {
        data[list]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids("installations"), vec![a.1.clone()]);
    assert_eq!(data["installations"]["nodes"][0]["connection"]["id"], a.0.as_str());
    assert_eq!(ids("operations"), vec![a.2.clone()]);
    assert_eq!(data["installations"]["nodes"][0]["operations"]["nodes"][0]["id"], a.2.as_str());
    // Group B by id: exactly like an id that does not exist, for every kind of object.
    let missing = uuid::Uuid::now_v7().to_string();
    for id in [&b.1, &missing] {
        for query in [
            "query($id: UUID!) { installation(id: $id) { id } }",
            "query($id: UUID!) { installationHistory(id: $id) { events { eventType } } }",
            "query($id: UUID!) { verifyInstallation(id: $id) { intact } }",
        ] {
            let body = ask(&app, &token, query, json!({"id": id})).await;
            assert_eq!(error_code(&body), "not_found", "{query} {id}: {body}");
        }
    }
    for (query, id) in [
        ("query($id: UUID!) { connection(id: $id) { id } }", &b.0),
        ("query($id: UUID!) { operation(id: $id) { id } }", &b.2),
    ] {
        let theirs = ask(&app, &token, query, json!({"id": id})).await;
        let nobody = ask(&app, &token, query, json!({"id": missing})).await;
        assert_eq!(theirs, nobody, "{query}");
        assert_eq!(error_code(&theirs), "not_found");
    }
    // Mutations on group B's objects: not found, nothing appended.
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    for (mutation, id) in [
        ("mutation($id: UUID!) { pauseInstallation(id: $id) { id } }", &b.1),
        ("mutation($id: UUID!) { deleteInstallation(id: $id) { id } }", &b.1),
        ("mutation($id: UUID!) { triggerRead(installationId: $id) { id } }", &b.1),
        ("mutation($id: UUID!) { updateInstallation(id: $id, objects: []) { id } }", &b.1),
        (
            "mutation($id: UUID!) { writeRecords(installationId: $id, object: \"contacts\", records: [{}]) { id } }",
            &b.1,
        ),
        ("mutation($id: UUID!) { cancelOperation(id: $id) { id } }", &b.2),
        ("mutation($id: UUID!) { revokeConnection(id: $id) { id } }", &b.0),
    ] {
        let body = ask(&app, &token, mutation, json!({"id": id})).await;
        assert_eq!(error_code(&body), "not_found", "{mutation}: {body}");
    }
    // Creating in group B, or with B's connection, is refused.
    let body = ask(
        &app,
        &token,
        "mutation($i: CreateConnectionInput!) { createConnection(input: $i) { id } }",
        json!({"i": {"integrationId": integration, "groupRef": "group-b", "credentials": {"access_token": "t"}}}),
    )
    .await;
    assert_eq!(error_code(&body), "forbidden", "{body}");
    let body = ask(
        &app,
        &token,
        "mutation($i: CreateInstallationInput!) { createInstallation(input: $i) { id } }",
        json!({"i": {"integrationId": integration, "connectionId": b.0, "groupRef": "group-a", "consumerRef": "c"}}),
    )
    .await;
    assert_eq!(error_code(&body), "not_found", "{body}");
    let body = ask(
        &app,
        &token,
        "mutation($i: ConnectSessionInput!) { createConnectSession(input: $i) { id } }",
        json!({"i": {"integrationId": integration, "groupRef": "group-b", "consumerRef": "c"}}),
    )
    .await;
    assert_eq!(error_code(&body), "forbidden", "{body}");
    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.db.pool).await.unwrap();
    assert_eq!(events_after, events_before, "a refused mutation appended something");
    // Project-wide things need an API key.
    for query in [
        "{ providerApps { provider } }",
        "{ projectHistory { events { eventType } } }",
        "{ destinations { name } }",
        "{ jwtKeys { kid } }",
        "mutation { createDestination(name: \"x\", url: \"https://hooks.example/x\") { name } }",
    ] {
        let body = ask(&app, &token, query, json!({})).await;
        assert_eq!(error_code(&body), "forbidden", "{query}: {body}");
    }
    let export = reqwest::Client::new()
        .get(format!("{}/v1/audit/project/events", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 403);
    let export = reqwest::Client::new()
        .get(format!("{}/v1/audit/installations/{}/events", app.base, b.1))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 404);
    // Its own group: it acts, and the log says who.
    let data = app.data(&token, "mutation($id: UUID!) { pauseInstallation(id: $id) { id } }", json!({"id": a.1})).await;
    assert_eq!(data["pauseInstallation"]["id"], a.1.as_str());
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor' FROM events WHERE aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&a.1)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, format!("jwt:{}:group-a", signer.kid));
    app.stop().await;
}

/// Every way a token can be wrong is refused as unauthenticated: expired, too long-lived,
/// no `exp`, no `group_ref`, an unknown or revoked `kid`, `alg: none`, HS256 signed with the
/// public key, an unsigned or altered token, another key's signature. ES256 and RS256 keys
/// work like EdDSA ones, and the keys' changes are in the project's history.
#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_wrongly_signed_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let p = app.project("Acme").await;
    let (ed_private, ed_public) = key_pair(&["-algorithm", "ed25519"]);
    let (ec_private, ec_public) = key_pair(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (rsa_private, rsa_public) = key_pair(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let ed = Signer {
        kid: register(&app, &p, "EdDSA", &ed_public).await,
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_pem(ed_private.as_bytes()).unwrap(),
    };
    let ec = Signer {
        kid: register(&app, &p, "ES256", &ec_public).await,
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(ec_private.as_bytes()).unwrap(),
    };
    let rsa = Signer {
        kid: register(&app, &p, "RS256", &rsa_public).await,
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_pem(rsa_private.as_bytes()).unwrap(),
    };
    for signer in [&ed, &ec, &rsa] {
        let data = app.data(&signer.for_group("g"), "{ viewer { groupRef } }", json!({})).await;
        assert_eq!(data["viewer"]["groupRef"], "g", "{:?}", signer.alg);
    }
    // Bad keys are refused when registered.
    for (alg, key) in [("HS256", ed_public.as_str()), ("ES256", ed_public.as_str()), ("EdDSA", "not a key")] {
        let body = ask(
            &app,
            &p.admin,
            "mutation($a: String!, $k: String!) { createJwtKey(algorithm: $a, publicKey: $k) { kid } }",
            json!({"a": alg, "k": key}),
        )
        .await;
        assert_eq!(error_code(&body), "invalid_input", "{alg}: {body}");
    }
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = json!({"group_ref": "g", "exp": now() + 300});
    let good = ed.for_group("g");
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let hs256_with_public_key = {
        let header = Header { kid: Some(ed.kid.clone()), ..Header::new(Algorithm::HS256) };
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(ed_public.as_bytes())).unwrap()
    };
    let other_key = {
        let (private, _) = key_pair(&["-algorithm", "ed25519"]);
        Signer {
            kid: ed.kid.clone(),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
        }
    };
    let refused = [
        ("expired", ed.token(json!({"group_ref": "g", "exp": now() - 120}))),
        ("lives two days", ed.token(json!({"group_ref": "g", "exp": now() + 2 * 86_400}))),
        ("no exp", ed.token(json!({"group_ref": "g"}))),
        ("no group_ref", ed.token(json!({"exp": now() + 300}))),
        ("empty group_ref", ed.token(json!({"group_ref": " ", "exp": now() + 300}))),
        ("not yet valid", ed.token(json!({"group_ref": "g", "exp": now() + 300, "nbf": now() + 200}))),
        (
            "unknown kid",
            Signer {
                kid: uuid::Uuid::now_v7().to_string(),
                alg: Algorithm::EdDSA,
                key: EncodingKey::from_ed_pem(ed_private.as_bytes()).unwrap(),
            }
            .for_group("g"),
        ),
        ("no kid", jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &ed.key).unwrap()),
        ("alg none", format!("{}.{}.", b64(json!({"alg": "none", "kid": ed.kid})), b64(claims.clone()))),
        ("HS256 with the public key", hs256_with_public_key),
        ("unsigned", format!("{head}.{}.", b64(claims.clone()))),
        ("altered claims", format!("{head}.{}.{signature}", b64(json!({"group_ref": "other", "exp": now() + 300})))),
        ("another key's signature", other_key.for_group("g")),
        ("ES256 header on an EdDSA key", {
            let header = Header { kid: Some(ed.kid.clone()), ..Header::new(Algorithm::ES256) };
            jsonwebtoken::encode(&header, &claims, &ec.key).unwrap()
        }),
        ("garbage", "a.b.c".to_string()),
    ];
    for (why, token) in refused {
        let body = ask(&app, &token, "{ viewer { scope } }", json!({})).await;
        assert_eq!(error_code(&body), "unauthenticated", "{why}: {body}");
    }
    // A revoked key's tokens are refused (within the cache's second).
    let body = ask(&app, &p.admin, "mutation($k: UUID!) { revokeJwtKey(kid: $k) { id } }", json!({"k": ec.kid})).await;
    assert!(body["errors"].is_null(), "{body}");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let body = ask(&app, &ec.for_group("g"), "{ viewer { scope } }", json!({})).await;
    assert_eq!(error_code(&body), "unauthenticated", "{body}");
    let data = app.data(&p.admin, "{ jwtKeys { algorithm revokedAt } }", json!({})).await;
    let revoked: Vec<bool> = data["jwtKeys"].as_array().unwrap().iter().map(|k| !k["revokedAt"].is_null()).collect();
    assert_eq!(revoked, [false, true, false]);
    let data = app.data(&p.admin, "{ projectHistory { events { eventType } } }", json!({})).await;
    let kinds: Vec<&str> =
        data["projectHistory"]["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "JwtKeyCreated").count(), 3);
    assert_eq!(kinds.last(), Some(&"JwtKeyRevoked"));
    app.stop().await;
}
