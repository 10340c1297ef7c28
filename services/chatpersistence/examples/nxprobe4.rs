use mongodb::bson::{doc, Document};
use mongodb::Client;
use futures::TryStreamExt;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let uri = std::env::args().nth(1).expect("uri");
    let client = Client::with_uri_str(&uri).await.expect("client");
    let c = client.database("perf").collection::<Document>("messages");
    for (what, filter) in [
        ("_id >= r3-009900 & pending", doc!{"_id": {"$gte": "r3-009900"}, "outbox_pending": true}),
        ("_id >= r3-000000 & pending", doc!{"_id": {"$gte": "r3-000000"}, "outbox_pending": true}),
        ("_id >= r3-009900", doc!{"_id": {"$gte": "r3-009900"}}),
        ("message_id >= r3-009900", doc!{"message_id": {"$gte": "r3-009900"}}),
        ("_id in 3", doc!{"_id": {"$in": ["r3-009900", "r1-000001", "p2"]}}),
        ("pending only", doc!{"outbox_pending": true}),
    ] {
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..10 { let v: Vec<Document> = c.find(filter.clone()).sort(doc!{"_id": 1}).limit(500).await.expect("f").try_collect().await.expect("c"); n = v.len(); }
        println!("{what}: {:?} ({n} docs)", t.elapsed() / 10);
    }
}
