//! Arbitrary query strings and bodies read into the API's parameters, then into a typed request
//! through the lenient readers: an error or a value, never a panic.

#![no_main]

use axum::http::Method;
use fleetrun_controller::api::params::{Params, lenient};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use serde::Deserialize;

/// The shapes the API's requests are made of.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Request {
    #[serde(deserialize_with = "lenient::int")]
    bk_scope_id: i64,
    #[serde(default, deserialize_with = "lenient::opt_int")]
    job_instance_id: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    return_ip_result: Option<bool>,
    #[serde(default, deserialize_with = "lenient::text")]
    bk_scope_type: String,
    #[serde(default, deserialize_with = "lenient::opt_int_list")]
    host_id_list: Option<Vec<i64>>,
    #[serde(default)]
    script_content: Option<String>,
    #[serde(default)]
    target_server: Option<serde_json::Value>,
}

fn run(mut u: Unstructured) -> Result<()> {
    let method = if u.arbitrary()? {
        Method::GET
    } else {
        Method::POST
    };
    let query: Option<&str> = u.arbitrary()?;
    let body = u.take_rest();
    if let Ok(params) = Params::from_request(&method, query, body) {
        let _ = params.str("bk_scope_type");
        let _ = params.parse::<Request>();
        let _ = params.parse::<serde_json::Value>();
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(Unstructured::new(data));
});
