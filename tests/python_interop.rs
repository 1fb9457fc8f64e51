//! dgbit's Python side (pynng) against `dgbit-bus serve`, unchanged.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use common::{run_python, ServeProcess, TestAddresses};

#[test]
fn a_pynng_client_gets_a_dgbit_shaped_reply_for_every_request() {
    let addresses = TestAddresses::new();
    let _bus = ServeProcess::start(&addresses.addresses, &[]);
    let lines = run_python(
        "req_client.py",
        &[&addresses.addresses.command],
        Duration::from_secs(60),
    );
    let replies: HashMap<String, Value> = lines
        .into_iter()
        .map(|line| {
            (
                line["case"].as_str().unwrap().to_string(),
                line["reply"].clone(),
            )
        })
        .collect();

    let ok = &replies["with_command"];
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["job_uuid"], "550e8400-e29b-41d4-a716-446655440000");
    assert_eq!(ok["result"]["pong"], true);
    assert!(
        ok.get("request_id").is_none(),
        "no request_id was sent: {ok}"
    );

    let default = &replies["without_command"];
    assert_eq!(default["job_uuid"], "job-default");
    assert_eq!(
        default["code"], "unknown_command",
        "serve has no run_backtest: {default}"
    );
    assert!(default["error"].as_str().unwrap().contains("run_backtest"));

    let by_request_id = &replies["request_id_only"];
    assert_eq!(by_request_id["job_uuid"], "req-7");
    assert_eq!(by_request_id["request_id"], "req-7");

    for case in ["not_json", "not_utf8", "not_an_object"] {
        let reply = &replies[case];
        assert_eq!(reply["status"], "error", "{case}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{case}: {reply}");
        assert_eq!(reply["job_uuid"], Value::Null, "{case}: {reply}");
        assert!(!reply["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(replies["wrong_type"]["code"], "bad_request");
    assert_eq!(replies["wrong_type"]["job_uuid"], "bad-type");
    assert!(replies["wrong_type"]["error"]
        .as_str()
        .unwrap()
        .contains("command"));

    assert_eq!(replies["unknown_command"]["code"], "unknown_command");
    assert_eq!(replies["unknown_command"]["request_id"], "u-1");

    let big = &replies["one_mib_payload"];
    assert_eq!(big["status"], "ok", "{big}");
    assert_eq!(big["result"], json!({"blob_length": 1024 * 1024}));

    assert_eq!(replies["after_all_that"]["result"]["pong"], true);
}
