use super::*;

/// Tasks of `web` as the API lists them: one running on a ready node (ports listed once per
/// IP family), one still starting, one on a node that is not active, and one running but
/// told to shut down.
const TASKS: &str = r#"[
  {"ID":"t1","ServiceID":"s1","NodeID":"n1","DesiredState":"running",
   "Status":{"State":"running","PortStatus":{"Ports":[
     {"Protocol":"tcp","TargetPort":8080,"PublishedPort":30001,"PublishMode":"host"},
     {"Protocol":"tcp","TargetPort":8080,"PublishedPort":30001,"PublishMode":"host"}]}},
   "NetworksAttachments":[
     {"Network":{"Spec":{"Name":"ingress"}},"Addresses":["10.0.0.5/24"]},
     {"Network":{"Spec":{"Name":"app"}},"Addresses":["10.0.1.5/24"]}]},
  {"ID":"t2","ServiceID":"s1","NodeID":"n1","DesiredState":"running",
   "Status":{"State":"starting"}},
  {"ID":"t3","ServiceID":"s1","NodeID":"n9","DesiredState":"running",
   "Status":{"State":"running"}},
  {"ID":"t4","ServiceID":"s1","NodeID":"n1","DesiredState":"shutdown",
   "Status":{"State":"running"}}
]"#;

#[test]
fn only_running_tasks_on_usable_nodes_count() {
    let raw: Vec<RawTask> = serde_json::from_str(TASKS).unwrap();
    let services = HashMap::from([(
        "s1".to_string(),
        (
            "web".to_string(),
            BTreeMap::from([("xlb.service".to_string(), "web".to_string())]),
        ),
    )]);
    let nodes = HashMap::from([("n1".to_string(), Some("10.98.0.1".parse().unwrap()))]);
    let out = tasks(raw, &services, &nodes);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(!out[0].draining);
    assert_eq!((out[1].id.as_str(), out[1].draining), ("t4", true));
    let t = &out[0];
    assert_eq!((t.id.as_str(), t.service.as_str()), ("t1", "web"));
    assert_eq!(t.node_addr, Some("10.98.0.1".parse().unwrap()));
    assert_eq!(
        t.published,
        [(8080, 30001, "tcp".to_string())],
        "deduplicated"
    );
    assert_eq!(
        t.networks,
        [("app".to_string(), "10.0.1.5".parse().unwrap())],
        "ingress left out"
    );
}
