use crate::support::*;
use amplog_domain::operation::*;
use amplog_domain::upcast::page_recorded_v1_to_v2;
use amplog_domain::*;
use serde_json::json;

fn requested() -> OperationEvent {
    OperationEvent::Requested {
        project_id: id(1),
        installation_id: id(2),
        connection_id: id(3),
        op_type: OperationType::Read,
        object: "contacts".into(),
        since: None,
        until: None,
        trigger: Trigger::Backfill,
        at: t(0),
    }
}

const LEASE: u128 = 70;

fn started(lease: u128, until: i64) -> OperationEvent {
    OperationEvent::Started { attempt: 1, lease_id: id(lease), lease_until: t(until), at: t(1) }
}

fn page(records: u64) -> OperationEvent {
    OperationEvent::PageRecorded {
        lease_id: id(LEASE),
        records,
        bytes: records * 100,
        cursor: Cursor { watermark: Some(t(2)), page_token: Some("p2".into()) },
        at: t(2),
        reread: 0,
    }
}

fn failed(retryable: bool) -> OperationEvent {
    OperationEvent::Failed { error_class: ErrorClass::Provider5xx, message: "503".into(), retryable, at: t(3) }
}

fn proxy_call(status: Option<u16>) -> ProxyCall {
    ProxyCall {
        method: "GET".into(),
        path: "/crm/v3/objects/contacts/1".into(),
        status,
        request_bytes: 0,
        response_bytes: 120,
        duration_ms: 40,
        error_class: status.filter(|s| *s >= 400).map(|_| ErrorClass::BadRequest),
        refreshed: false,
        aborted: false,
    }
}

fn proxied(status: u16) -> OperationEvent {
    OperationEvent::Proxied {
        project_id: id(1),
        installation_id: id(2),
        connection_id: id(3),
        call: proxy_call(Some(status)),
        at: t(3),
    }
}

fn states() -> Vec<(&'static str, Vec<OperationEvent>)> {
    vec![
        ("none", vec![]),
        ("pending", vec![requested()]),
        ("running", vec![requested(), started(LEASE, 30)]),
        ("running_expired_lease", vec![requested(), started(LEASE, 4)]),
        (
            "running_released",
            vec![requested(), started(LEASE, 30), OperationEvent::LeaseReleased { lease_id: id(LEASE), at: t(3) }],
        ),
        (
            "succeeded",
            vec![requested(), started(LEASE, 30), OperationEvent::Succeeded { records: 0, pages: 0, at: t(3) }],
        ),
        ("failed_retryable", vec![requested(), started(LEASE, 30), failed(true)]),
        ("failed_permanent", vec![requested(), started(LEASE, 30), failed(false)]),
        ("cancelled", vec![requested(), OperationEvent::Cancelled { reason: "user".into(), at: t(3) }]),
        ("proxied", vec![proxied(200)]),
        ("proxied_failed", vec![proxied(404)]),
    ]
}

fn commands(lease: u128) -> Vec<(&'static str, OperationCommand)> {
    vec![
        (
            "request",
            OperationCommand::Request {
                project_id: id(1),
                installation_id: id(2),
                connection_id: id(3),
                op_type: OperationType::Read,
                object: "contacts".into(),
                since: None,
                until: None,
                trigger: Trigger::Triggered,
                at: t(0),
            },
        ),
        ("start", OperationCommand::Start { lease_id: id(71), lease_until: t(40), at: t(10) }),
        (
            "record_page",
            OperationCommand::RecordPage {
                lease_id: id(lease),
                records: 5,
                bytes: 9,
                cursor: Cursor::default(),
                at: t(10),
            },
        ),
        (
            "record_pages",
            OperationCommand::RecordPages {
                lease_id: id(lease),
                pages: vec![PageRecord { records: 1, bytes: 2, cursor: Cursor::default(), reread: 0 }; 2],
                at: t(10),
            },
        ),
        ("succeed", OperationCommand::Succeed { lease_id: id(lease), at: t(10) }),
        (
            "fail",
            OperationCommand::Fail {
                lease_id: id(lease),
                error_class: ErrorClass::RateLimited,
                message: "429".into(),
                retryable: true,
                at: t(10),
            },
        ),
        ("retry", OperationCommand::Retry { at: t(10) }),
        ("cancel", OperationCommand::Cancel { reason: "user".into(), at: t(10) }),
        ("release", OperationCommand::ReleaseLease { lease_id: id(lease), at: t(10) }),
        ("replay", OperationCommand::ReplayDeadLetter { at: t(10) }),
        (
            "proxy",
            OperationCommand::RecordProxyCall {
                project_id: id(1),
                installation_id: id(2),
                connection_id: id(3),
                call: proxy_call(Some(200)),
                at: t(10),
            },
        ),
    ]
}

#[test]
fn every_command_in_every_state_as_the_lease_holder() {
    use OperationError::*;
    use OperationStatus::*;
    let done = |s| Err(AlreadyFinished(s));
    const PAGES: &[&str] = &["PageRecorded", "PageRecorded"];
    // columns: request, start, record_page, record_pages, succeed, fail, retry, cancel, release, replay, proxy
    #[rustfmt::skip]
    let table: Vec<(&str, Vec<Expect<OperationError>>)> = vec![
        ("none", vec![Ok(&["Requested"]), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Err(NotFound), Ok(&["Proxied"])]),
        ("pending", vec![Err(AlreadyExists), Ok(&["Started"]), Err(NotRunning), Err(NotRunning), Err(NotRunning), Err(NotRunning), Err(NotFailed), Ok(&["Cancelled"]), Err(NotRunning), Err(NotFailed), Err(AlreadyExists)]),
        ("running", vec![Err(AlreadyExists), Err(LeaseHeld), Ok(&["PageRecorded"]), Ok(PAGES), Ok(&["Succeeded"]), Ok(&["Failed"]), Err(NotFailed), Ok(&["Cancelled"]), Ok(&["LeaseReleased"]), Err(NotFailed), Err(AlreadyExists)]),
        ("running_expired_lease", vec![Err(AlreadyExists), Ok(&["Started"]), Ok(&["PageRecorded"]), Ok(PAGES), Ok(&["Succeeded"]), Ok(&["Failed"]), Err(NotFailed), Ok(&["Cancelled"]), Ok(&["LeaseReleased"]), Err(NotFailed), Err(AlreadyExists)]),
        ("running_released", vec![Err(AlreadyExists), Ok(&["Started"]), Err(StaleLease), Err(StaleLease), Err(StaleLease), Err(StaleLease), Err(NotFailed), Ok(&["Cancelled"]), Err(StaleLease), Err(NotFailed), Err(AlreadyExists)]),
        ("succeeded", vec![Err(AlreadyExists), done(Succeeded), done(Succeeded), done(Succeeded), done(Succeeded), done(Succeeded), Err(NotFailed), done(Succeeded), done(Succeeded), Err(NotFailed), Err(AlreadyExists)]),
        ("failed_retryable", vec![Err(AlreadyExists), done(Failed), done(Failed), done(Failed), done(Failed), done(Failed), Ok(&["Retried"]), done(Failed), done(Failed), Ok(&["DeadLetterReplayed"]), Err(AlreadyExists)]),
        ("failed_permanent", vec![Err(AlreadyExists), done(Failed), done(Failed), done(Failed), done(Failed), done(Failed), Ok(&["Retried"]), done(Failed), done(Failed), Err(NotDeadLettered), Err(AlreadyExists)]),
        ("cancelled", vec![Err(AlreadyExists), done(Cancelled), done(Cancelled), done(Cancelled), done(Cancelled), done(Cancelled), Err(NotFailed), done(Cancelled), done(Cancelled), Err(NotFailed), Err(AlreadyExists)]),
        ("proxied", vec![Err(AlreadyExists), done(Succeeded), done(Succeeded), done(Succeeded), done(Succeeded), done(Succeeded), Err(NotFailed), done(Succeeded), done(Succeeded), Err(NotFailed), Err(AlreadyExists)]),
        ("proxied_failed", vec![Err(AlreadyExists), done(Failed), done(Failed), done(Failed), done(Failed), done(Failed), Err(NotRetryable), done(Failed), done(Failed), Err(NotDeadLettered), Err(AlreadyExists)]),
    ];
    check_matrix::<Operation>(&states(), &commands(LEASE), &table);
}

#[test]
fn only_the_current_lease_may_record_or_finish() {
    use OperationError::StaleLease;
    let running = vec![requested(), started(LEASE, 30)];
    for (name, command) in
        commands(99).into_iter().filter(|(n, _)| matches!(*n, "record_page" | "record_pages" | "succeed" | "fail"))
    {
        let result = Operation::replay(&running).decide(&command);
        assert_eq!(result, Err(StaleLease), "{name} with a stale lease");
    }
    // After a takeover, the old holder is fenced off.
    let mut history = running.clone();
    history.push(OperationEvent::Started { attempt: 2, lease_id: id(71), lease_until: t(90), at: t(31) });
    given::<Operation>(&history)
        .when(OperationCommand::Succeed { lease_id: id(LEASE), at: t(32) })
        .then_err(StaleLease);
    given::<Operation>(&history)
        .when(OperationCommand::Succeed { lease_id: id(71), at: t(32) })
        .then_types(&["Succeeded"]);
}

#[test]
fn attempts_pages_and_records_accumulate() {
    let history = vec![
        requested(),
        started(LEASE, 30),
        page(100),
        page(40),
        failed(true),
        OperationEvent::Retried { at: t(4) },
        OperationEvent::Started { attempt: 2, lease_id: id(LEASE), lease_until: t(30), at: t(5) },
    ];
    let state = Operation::replay(&history);
    assert_eq!(state.status, OperationStatus::Running);
    assert_eq!(state.attempts, 2);
    assert_eq!((state.pages, state.records, state.bytes), (2, 140, 14_000));
    assert_eq!(state.started_at, Some(t(1)));
    given::<Operation>(&history)
        .when(OperationCommand::Start { lease_id: id(80), lease_until: t(100), at: t(50) })
        .then(&[OperationEvent::Started { attempt: 3, lease_id: id(80), lease_until: t(100), at: t(50) }]);
    given::<Operation>(&history)
        .when(OperationCommand::Succeed { lease_id: id(LEASE), at: t(6) })
        .then(&[OperationEvent::Succeeded { records: 140, pages: 2, at: t(6) }]);
}

#[test]
fn bad_requests_are_refused() {
    let request = |object: &str, since, until| OperationCommand::Request {
        project_id: id(1),
        installation_id: id(2),
        connection_id: id(3),
        op_type: OperationType::Read,
        object: object.into(),
        since,
        until,
        trigger: Trigger::Triggered,
        at: t(0),
    };
    given::<Operation>(&[]).when(request("", None, None)).then_err(OperationError::MissingObject);
    given::<Operation>(&[]).when(request("contacts", Some(t(5)), Some(t(5)))).then_err(OperationError::InvalidWindow);
    given::<Operation>(&[requested(), started(LEASE, 30)])
        .when(OperationCommand::RecordPages { lease_id: id(LEASE), pages: vec![], at: t(3) })
        .then_err(OperationError::NoPages);
    given::<Operation>(&[requested()])
        .when(OperationCommand::Start { lease_id: id(1), lease_until: t(0), at: t(0) })
        .then_err(OperationError::InvalidLease);
}

#[test]
fn events_round_trip_through_their_stored_parts() {
    for event in [requested(), started(LEASE, 30), page(3), failed(true), OperationEvent::Retried { at: t(9) }] {
        let parts = event.to_parts();
        assert_eq!(OperationEvent::from_parts(&parts.event_type, parts.payload).unwrap(), event);
    }
    assert_eq!(page(1).to_parts().event_version, "2.0");
    assert_eq!(requested().to_parts().event_version, "1.0");
}

#[test]
fn page_recorded_v1_upcasts_to_v2() {
    let v1 = json!({"lease_id": uuid::Uuid::from_u128(LEASE), "count": 42, "cursor": "after-42", "at": t(2)});
    let v2 = page_recorded_v1_to_v2(v1);
    let event = OperationEvent::from_parts("PageRecorded", v2).unwrap();
    assert_eq!(
        event,
        OperationEvent::PageRecorded {
            lease_id: id(LEASE),
            records: 42,
            bytes: 0,
            cursor: Cursor { watermark: None, page_token: Some("after-42".into()) },
            at: t(2),
            reread: 0,
        }
    );
}

#[test]
fn deliveries_are_recorded_for_the_next_page_only() {
    let attempt = |page, attempt, delivered: bool| DeliveryAttempt {
        webhook_id: format!("msg_{page}"),
        destination: "sink".into(),
        page,
        attempt,
        status: Some(if delivered { 200 } else { 503 }),
        error: (!delivered).then(|| "503".into()),
        delivered,
    };
    let running = vec![requested(), started(LEASE, 30), page(10)];
    let next = PageRecord { records: 7, bytes: 70, cursor: Cursor::default(), reread: 0 };
    given::<Operation>(&running)
        .when(OperationCommand::RecordDeliveryFailure { lease_id: id(LEASE), delivery: attempt(2, 1, false), at: t(4) })
        .then(&[OperationEvent::DeliveryAttempted { lease_id: id(LEASE), delivery: attempt(2, 1, false), at: t(4) }]);
    given::<Operation>(&running)
        .when(OperationCommand::RecordDeliveredPage {
            lease_id: id(LEASE),
            delivery: attempt(2, 2, true),
            page: next.clone(),
            at: t(5),
        })
        .then(&[
            OperationEvent::DeliveryAttempted { lease_id: id(LEASE), delivery: attempt(2, 2, true), at: t(5) },
            OperationEvent::PageRecorded {
                lease_id: id(LEASE),
                records: 7,
                bytes: 70,
                cursor: Cursor::default(),
                at: t(5),
                reread: 0,
            },
        ]);
    // Page 1 is already recorded; page 3 would skip page 2.
    for page in [1, 3] {
        given::<Operation>(&running)
            .when(OperationCommand::RecordDeliveredPage {
                lease_id: id(LEASE),
                delivery: attempt(page, 1, true),
                page: next.clone(),
                at: t(5),
            })
            .then_err(OperationError::WrongPage { expected: 2 });
    }
    given::<Operation>(&running)
        .when(OperationCommand::RecordDeliveredPage {
            lease_id: id(LEASE),
            delivery: attempt(2, 1, false),
            page: next.clone(),
            at: t(5),
        })
        .then_err(OperationError::DeliveryMismatch);
    given::<Operation>(&running)
        .when(OperationCommand::RecordDeliveryFailure { lease_id: id(99), delivery: attempt(2, 1, false), at: t(4) })
        .then_err(OperationError::StaleLease);
}

#[test]
fn a_released_lease_is_taken_at_once_and_only_its_holder_releases_it() {
    let running = vec![requested(), started(LEASE, 30)];
    given::<Operation>(&running)
        .when(OperationCommand::ReleaseLease { lease_id: id(99), at: t(5) })
        .then_err(OperationError::StaleLease);
    given::<Operation>(&running)
        .when(OperationCommand::ReleaseLease { lease_id: id(LEASE), at: t(5) })
        .then(&[OperationEvent::LeaseReleased { lease_id: id(LEASE), at: t(5) }]);
    let mut released = running.clone();
    released.push(OperationEvent::LeaseReleased { lease_id: id(LEASE), at: t(5) });
    // Long before the released lease would have ended.
    given::<Operation>(&released)
        .when(OperationCommand::Start { lease_id: id(71), lease_until: t(60), at: t(6) })
        .then(&[OperationEvent::Started { attempt: 2, lease_id: id(71), lease_until: t(60), at: t(6) }]);
    // The old holder can no longer record anything.
    given::<Operation>(&released)
        .when(OperationCommand::Succeed { lease_id: id(LEASE), at: t(6) })
        .then_err(OperationError::StaleLease);
}

#[test]
fn the_holder_renews_its_lease_and_a_renewed_lease_is_not_taken_over() {
    let running = vec![requested(), started(LEASE, 30)];
    given::<Operation>(&running)
        .when(OperationCommand::RenewLease { lease_id: id(LEASE), lease_until: t(90), at: t(20) })
        .then(&[OperationEvent::LeaseRenewed { lease_id: id(LEASE), lease_until: t(90), at: t(20) }]);
    given::<Operation>(&running)
        .when(OperationCommand::RenewLease { lease_id: id(99), lease_until: t(90), at: t(20) })
        .then_err(OperationError::StaleLease);
    given::<Operation>(&running)
        .when(OperationCommand::RenewLease { lease_id: id(LEASE), lease_until: t(20), at: t(20) })
        .then_err(OperationError::InvalidLease);
    let mut renewed = running.clone();
    renewed.push(OperationEvent::LeaseRenewed { lease_id: id(LEASE), lease_until: t(90), at: t(20) });
    // Past the first lease's end, but not the renewed one's.
    given::<Operation>(&renewed)
        .when(OperationCommand::Start { lease_id: id(71), lease_until: t(100), at: t(40) })
        .then_err(OperationError::LeaseHeld);
}

#[test]
fn a_proxy_call_is_one_finished_operation() {
    let state = Operation::replay(&[proxied(502)]);
    assert_eq!(state.op_type, Some(OperationType::Proxy));
    assert_eq!(state.status, OperationStatus::Failed);
    assert_eq!(state.object, "GET /crm/v3/objects/contacts/1");
    assert_eq!(state.bytes, 120);
    assert_eq!(state.finished_at, Some(t(3)));
    assert!(state.started_at < state.finished_at);
    let record = |method: &str, path: &str| OperationCommand::RecordProxyCall {
        project_id: id(1),
        installation_id: id(2),
        connection_id: id(3),
        call: ProxyCall { method: method.into(), path: path.into(), ..proxy_call(None) },
        at: t(3),
    };
    given::<Operation>(&[]).when(record("", "/x")).then_err(OperationError::InvalidProxyCall);
    given::<Operation>(&[]).when(record("GET", "")).then_err(OperationError::InvalidProxyCall);
    given::<Operation>(&[])
        .when(record("GET", &"a".repeat(PROXY_PATH_MAX + 1)))
        .then_err(OperationError::InvalidProxyCall);
    given::<Operation>(&[]).when(record(&"A".repeat(17), "/x")).then_err(OperationError::InvalidProxyCall);
    // An absurd duration is not a panic.
    let long = ProxyCall { duration_ms: u64::MAX, ..proxy_call(Some(200)) };
    let event = OperationEvent::Proxied {
        project_id: id(1),
        installation_id: id(2),
        connection_id: id(3),
        call: long,
        at: t(3),
    };
    assert!(Operation::replay(&[event]).started_at.is_some());
}
