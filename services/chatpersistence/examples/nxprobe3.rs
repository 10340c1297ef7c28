use mongodb::bson::{doc, Document};
use mongodb::Client;
use futures::TryStreamExt;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let uri = std::env::args().nth(1).expect("uri");
    let client = Client::with_uri_str(&uri).await.expect("client");
    let db = client.database("perf");
    let c = db.collection::<Document>("messages");
    let _ = c.drop().await;
    c.create_index(mongodb::IndexModel::builder().keys(doc! {"outbox_pending": 1, "message_id": 1}).options(mongodb::options::IndexOptions::builder().partial_filter_expression(doc!{"outbox_pending": true}).build()).build()).await.expect("idx");
    c.create_index(mongodb::IndexModel::builder().keys(doc! {"stream_id": 1, "message_id": 1}).build()).await.expect("idx");
    for round in 0..4 {
        let docs: Vec<Document> = (0..10000).map(|i| doc!{"_id": format!("r{round}-{i:06}"), "message_id": format!("r{round}-{i:06}"), "stream_id": format!("s{}", i % 100), "content": "some content here", "created_at": mongodb::bson::DateTime::now()}).collect();
        c.insert_many(docs).await.expect("ins");
        c.insert_one(doc!{"_id": format!("p{round}"), "message_id": format!("p{round}"), "stream_id": "s1", "outbox_pending": true}).await.expect("p");
        let t = Instant::now();
        for _ in 0..20 { let _: Vec<Document> = c.find(doc!{"outbox_pending": true}).sort(doc!{"message_id": 1}).limit(500).await.expect("f").try_collect().await.expect("c"); }
        let scan = t.elapsed() / 20;
        let t = Instant::now();
        for _ in 0..20 { let _: Vec<Document> = c.find(doc!{"stream_id": "s7", "message_id": {"$gt": "r0-005000"}}).sort(doc!{"message_id": 1}).limit(50).await.expect("f").try_collect().await.expect("c"); }
        let hist = t.elapsed() / 20;
        let t = Instant::now();
        for i in 0..20 { c.insert_one(doc!{"_id": format!("x{round}-{i}"), "message_id": format!("x{round}-{i}"), "stream_id": "s2", "outbox_pending": true}).await.expect("i"); }
        let ins = t.elapsed() / 20;
        let t = Instant::now();
        for i in 0..20 { c.update_many(doc!{"_id": {"$in": [format!("x{round}-{i}")]}, "outbox_pending": true}, doc!{"$unset": {"outbox_pending": ""}}).await.expect("u"); }
        let upd = t.elapsed() / 20;
        let t = Instant::now();
        for _ in 0..5 { c.count_documents(doc!{"outbox_pending": true}).await.expect("c"); }
        let cnt = t.elapsed() / 5;
        println!("{} docs: scan {scan:?} history {hist:?} insert {ins:?} clear {upd:?} count {cnt:?}", (round+1)*10000);
    }
}
