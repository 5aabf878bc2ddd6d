//! The filter's plugin configuration as any bytes: an error or a valid configuration, never a
//! panic; and a configuration accepted keeps the documented bounds.
#![no_main]
use jairouter_filter::config::{MAX_INSTANCES, MAX_WEIGHT};
use jairouter_filter::plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = Plan::from_json(data) else {
        return;
    };
    let mut total = 0;
    for service in cfg.services() {
        total += service.instances.len();
        for instance in &service.instances {
            assert!(instance.spec.weight <= MAX_WEIGHT);
        }
        for pool in service.models.values() {
            assert!(pool.rotation.len() <= 4096);
            for at in &pool.routable {
                assert!(*at < service.instances.len());
            }
        }
    }
    assert!(total <= MAX_INSTANCES);
    let keys = cfg.shared_keys();
    let _ = cfg.stale_keys(&cfg);
    assert!(serde_json::from_str::<serde_json::Value>(&cfg.models_json).is_ok());
    let _ = keys;
});
