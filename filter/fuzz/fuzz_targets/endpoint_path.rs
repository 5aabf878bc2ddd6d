//! Paths, query strings, service keys and client addresses as any text.
#![no_main]
use jairouter_filter::endpoint::{classify, Endpoint, Route, ServiceType};
use jairouter_filter::encoding::client_ip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (route, id) = classify(&text);
    // A model's id, or a stored response's: a piece of the path.
    if matches!(route, Route::RetrieveModel | Route::StoredResponse) {
        assert!(text.contains(id));
    } else {
        assert!(id.is_empty());
    }
    if let Route::Model(endpoint) = route {
        assert!(text.contains(endpoint.suffix()));
    }
    for endpoint in Endpoint::ALL {
        let path = endpoint.upstream_path(&text);
        assert!(!path.is_empty() || text.is_empty());
    }
    if let Some(kind) = ServiceType::from_config_key(&text) {
        assert_eq!(ServiceType::from_config_key(kind.key()), Some(kind));
    }
    let ip = client_ip(&text);
    assert!(text.contains(ip));
});
