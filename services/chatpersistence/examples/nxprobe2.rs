use mongodb::bson::{doc, Document};
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};
use mongodb::Client;
use futures::TryStreamExt;

#[tokio::main]
async fn main() {
    let uri = std::env::args().nth(1).expect("uri");
    let client = Client::with_uri_str(&uri).await.expect("client");
    let db = client.database("chat2");
    let l = db.collection::<Document>("relay_leases");
    let opts = FindOneAndUpdateOptions::builder().upsert(true).return_document(ReturnDocument::After).build();
    let now: i64 = 1000;
    let f = |me: &str, now: i64| doc! {"_id": "t", "$or": [{"holder": me}, {"expires_at": {"$lt": now}}]};
    let r = l.find_one_and_update(f("A", now), doc!{"$set": {"holder": "A", "expires_at": now + 5000}}).with_options(opts.clone()).await;
    println!("A acquire: {r:?}");
    let r = l.find_one_and_update(f("B", now+100), doc!{"$set": {"holder": "B", "expires_at": now + 5100}}).with_options(opts.clone()).await;
    println!("B acquire: {r:?}");
    let all: Vec<Document> = l.find(doc!{}).await.expect("f").try_collect().await.expect("c");
    println!("all: {all:?}");
    let r = l.find_one_and_update(f("B", 5500), doc!{"$set": {"holder": "B", "expires_at": 10500_i64}}).with_options(opts.clone()).await;
    println!("B takeover at 5500 (A expires 6000, should fail): {r:?}");
    let r = l.find_one_and_update(f("B", 6001), doc!{"$set": {"holder": "B", "expires_at": 11001_i64}}).with_options(opts.clone()).await;
    println!("B takeover at 6001: {r:?}");
    let r = l.find_one_and_update(f("A", 7000), doc!{"$set": {"holder": "A", "expires_at": 12000_i64}}).with_options(opts.clone()).await;
    println!("A renew at 7000 (should fail): {r:?}");
    let all: Vec<Document> = l.find(doc!{}).await.expect("f").try_collect().await.expect("c");
    println!("all: {all:?}");
    // update_one conditional as alternative
    let r = l.update_one(doc!{"_id": "t", "holder": "B"}, doc!{"$set": {"expires_at": 0_i64}}).await;
    println!("release: {r:?}");
    let c = db.collection::<Document>("m");
    let ids: Vec<String> = (0..600).map(|i| format!("id{i:04}")).collect();
    let docs: Vec<Document> = ids.iter().map(|i| doc!{"_id": i, "p": true}).collect();
    let r = c.insert_many(docs).await.map(|r| r.inserted_ids.len());
    println!("insert_many: {r:?}");
    let t = std::time::Instant::now();
    let r = c.update_many(doc!{"_id": {"$in": &ids[..500]}}, doc!{"$unset": {"p": ""}}).await;
    println!("unset 500 in {:?}: {r:?}", t.elapsed());
    // latency of single ops
    let t = std::time::Instant::now();
    for i in 0..200 { c.insert_one(doc!{"_id": format!("lat{i}"), "p": true, "s": "x"}).await.expect("ins"); }
    println!("insert avg {:?}", t.elapsed() / 200);
    let t = std::time::Instant::now();
    for _ in 0..200 { let _: Vec<Document> = c.find(doc!{"p": true}).sort(doc!{"_id": 1}).limit(20).await.expect("f").try_collect().await.expect("c"); }
    println!("find pending avg {:?}", t.elapsed() / 200);
    let t = std::time::Instant::now();
    for i in 0..200 { c.update_many(doc!{"_id": {"$in": [format!("lat{i}")]}}, doc!{"$unset": {"p": ""}}).await.expect("u"); }
    println!("unset avg {:?}", t.elapsed() / 200);
    // error when server missing
    let bad = Client::with_options({ let mut o = mongodb::options::ClientOptions::parse("mongodb://127.0.0.1:1/?directConnection=true").await.expect("o"); o.server_selection_timeout = Some(std::time::Duration::from_millis(500)); o }).expect("c");
    let r = bad.database("x").collection::<Document>("y").insert_one(doc!{"a":1}).await;
    println!("down: {r:?}");
}
