//! Organizations above projects, and a deployment operator's admin key: allowed in every
//! project it names, every use recorded in the log with its actor.

use amplog_api::testing::{error_code, TestApp};
use amplog_api::Keys;
use amplog_commands::CommandContext;
use amplog_domain::ProjectId;
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_key_acts_in_every_project_and_each_use_is_in_the_log() {
    let app = TestApp::spawn().await;
    let service = &app.service;
    let org = Uuid::now_v7();
    service.create_organization(org, "Acme Group", "test").await.unwrap();
    let projects: Vec<ProjectId> = (0..2).map(|_| ProjectId(Uuid::now_v7())).collect();
    for (i, project) in projects.iter().enumerate() {
        service.create_project_in(&CommandContext::new(*project, "test"), &format!("acme-{i}"), org).await.unwrap();
    }
    let outside = app.project("Elsewhere").await;
    let keys = Keys::new(service);
    let (admin_id, admin) = keys.create_admin_key(Some("on-call")).await.unwrap();
    let as_admin = |project: ProjectId, query: &'static str| {
        let (admin, project) = (admin.clone(), project.0.to_string());
        let app = &app;
        async move {
            app.gql_with(
                "",
                query,
                json!({}),
                &[("x-admin-key", admin.as_str()), ("x-amplog-project", project.as_str())],
            )
            .await
        }
    };
    // In each project it names: admin scope there, and the organization with its projects.
    for project in [projects[0], projects[1], outside.ctx.project_id] {
        let (status, body) = as_admin(project, "{ viewer { projectId scope } }").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["viewer"], json!({"projectId": project.0, "scope": "admin"}));
    }
    let (_, body) =
        as_admin(projects[0], "{ organizations { id name projects { id name } } organization { id name } }").await;
    assert_eq!(
        body["data"]["organizations"],
        json!([{"id": org, "name": "Acme Group", "projects": [
            {"id": projects[0].0, "name": "acme-0"}, {"id": projects[1].0, "name": "acme-1"}]}]),
        "{body}"
    );
    assert_eq!(body["data"]["organization"], json!({"id": org, "name": "Acme Group"}));
    // What it does is recorded with its actor, and so is every use, in the project used.
    let manifest = crate::api::MANIFEST;
    let (_, body) = app
        .gql_with(
            "",
            "mutation($m: String!) { declareIntegrations(manifest: $m) { id } }",
            json!({"m": manifest}),
            &[("x-admin-key", admin.as_str()), ("x-amplog-project", &projects[1].0.to_string())],
        )
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT metadata->>'actor' FROM events WHERE project_id = $1 AND aggregate_type = 'integration'",
    )
    .bind(projects[1].0)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(actors, [format!("admin_key:{admin_id}")]);
    let uses: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT project_id, payload->>'what' FROM events
         WHERE aggregate_type = 'admin_key' AND aggregate_id = $1 AND event_type = 'Used' ORDER BY sequence",
    )
    .bind(admin_id.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(uses.len(), 5, "{uses:?}");
    assert!(uses.iter().all(|(_, what)| what == "graphql"));
    assert_eq!(uses[4].0, projects[1].0);
    // The project sees the uses in its configuration history.
    let project_key = keys.create(projects[1], amplog_api::Scope::Admin, None).await.unwrap().1;
    let data =
        app.data(&project_key, "{ projectHistory { events { aggregateType eventType actor } } }", json!({})).await;
    let history: Vec<(String, String)> = data["projectHistory"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                format!("{}.{}", e["aggregateType"].as_str().unwrap(), e["eventType"].as_str().unwrap()),
                e["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        history[..3].iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["project.Created", "project.JoinedOrganization", "organization.ProjectAdded"]
    );
    assert_eq!(history.iter().filter(|(k, _)| k == "admin_key.Used").count(), 2, "{history:?}");
    // A project's own key sees its organization, not the others.
    let data = app.data(&project_key, "{ organization { id name projects { id } } }", json!({})).await;
    assert_eq!(data["organization"], json!({"id": org, "name": "Acme Group", "projects": null}));
    let (_, body) = app.gql(&project_key, "{ organizations { id } }", json!({})).await;
    assert_eq!(error_code(&body), "forbidden", "{body}");

    // Refused: no project named, an unknown project, a wrong or revoked key.
    let (status, body) = app.gql_with("", "{ viewer { scope } }", json!({}), &[("x-admin-key", admin.as_str())]).await;
    assert_eq!((status, error_code(&body)), (400, "project_required"), "{body}");
    let (status, _) = as_admin(ProjectId(Uuid::now_v7()), "{ viewer { scope } }").await;
    assert_eq!(status, 404);
    let project = projects[0].0.to_string();
    let wrong = format!("{}x", &admin[..admin.len() - 1]);
    for key in [wrong.as_str(), "amk_garbage", outside.admin.as_str()] {
        let (status, body) = app
            .gql_with("", "{ viewer { scope } }", json!({}), &[("x-admin-key", key), ("x-amplog-project", &project)])
            .await;
        assert_eq!((status, error_code(&body)), (401, "unauthenticated"), "{key}: {body}");
    }
    assert!(keys.revoke_admin_key(admin_id).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, _) = as_admin(projects[0], "{ viewer { scope } }").await;
    assert_eq!(status, 401);
    let revoked: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'admin_key' AND aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(admin_id.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(revoked, ["Revoked"]);
    app.stop().await;
}
