use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::{FindOneAndUpdateOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, IndexModel};
use futures::TryStreamExt;

#[tokio::main]
async fn main() {
    let uri = std::env::args().nth(1).expect("uri");
    let client = Client::with_uri_str(&uri).await.expect("client");
    let db = client.database("chat");
    let c = db.collection::<Document>("messages");
    let r = db.run_command(doc! {"ping": 1}).await;
    println!("ping: {r:?}");
    let r = c.create_index(IndexModel::builder().keys(doc! {"message_id": 1}).options(IndexOptions::builder().unique(true).build()).build()).await;
    println!("unique index: {r:?}");
    let r = c.create_index(IndexModel::builder().keys(doc! {"stream_id": 1, "message_id": 1}).build()).await;
    println!("compound: {r:?}");
    let r = c.create_index(IndexModel::builder().keys(doc! {"sender_id": 1, "client_message_id": 1}).options(IndexOptions::builder().unique(true).partial_filter_expression(doc!{"client_message_id": {"$exists": true}}).name("sender_client_message_id".to_string()).build()).build()).await;
    println!("partial unique: {r:?}");
    let r = c.create_index(IndexModel::builder().keys(doc! {"outbox_pending": 1, "message_id": 1}).options(IndexOptions::builder().partial_filter_expression(doc!{"outbox_pending": true}).name("outbox_pending".to_string()).build()).build()).await;
    println!("partial outbox: {r:?}");
    let r = c.create_index(IndexModel::builder().keys(doc! {"outbox_pending": 1, "message_id": 1}).options(IndexOptions::builder().sparse(true).name("outbox_sparse".to_string()).build()).build()).await;
    println!("sparse outbox: {r:?}");
    let idx: Vec<_> = c.list_indexes().await.expect("li").try_collect().await.expect("li2");
    println!("indexes: {idx:?}");

    let wc = mongodb::options::WriteConcern::builder().w(mongodb::options::Acknowledgment::Majority).journal(true).build();
    for i in 0..5 {
        let d = doc! {"_id": format!("m{i}"), "message_id": format!("m{i}"), "stream_id": "s1", "sender_id": "a", "created_at": DateTime::now(), "outbox_pending": true};
        let r = c.insert_one(d).write_concern(wc.clone()).await;
        println!("insert {i}: {r:?}");
    }
    let r = c.insert_one(doc! {"_id": "x1", "message_id": "x1", "stream_id": "s2", "sender_id": "a", "client_message_id": "k1"}).await;
    println!("insert k1: {r:?}");
    let r = c.insert_one(doc! {"_id": "x2", "message_id": "x2", "stream_id": "s2", "sender_id": "a", "client_message_id": "k1"}).await;
    println!("insert dup k1: {r:?}");
    let r = c.insert_one(doc! {"_id": "x3", "message_id": "x3", "stream_id": "s2", "sender_id": "b", "client_message_id": "k1"}).await;
    println!("insert k1 other sender: {r:?}");
    let r = c.insert_one(doc! {"_id": "x4", "message_id": "x4", "stream_id": "s2", "sender_id": "a"}).await;
    println!("insert no cmid: {r:?}");
    let r = c.insert_one(doc! {"_id": "x5", "message_id": "x5", "stream_id": "s2", "sender_id": "a"}).await;
    println!("insert no cmid 2 (partial must allow): {r:?}");
    let r = c.insert_one(doc! {"_id": "x5", "message_id": "x5b", "stream_id": "s2", "sender_id": "a"}).await;
    println!("dup _id: {r:?}");
    let r = c.insert_one(doc! {"_id": "x6", "message_id": "x5", "stream_id": "s2", "sender_id": "a"}).await;
    println!("dup message_id: {r:?}");

    let got: Vec<Document> = c.find(doc! {"stream_id": "s1", "message_id": {"$gt": "m1"}}).sort(doc!{"message_id": 1}).limit(2).await.expect("f").try_collect().await.expect("f2");
    println!("gt m1 asc limit2: {:?}", got.iter().map(|d| d.get_str("_id").unwrap_or("?")).collect::<Vec<_>>());
    let got: Vec<Document> = c.find(doc! {"stream_id": "s1", "message_id": {"$lt": "m3"}}).sort(doc!{"message_id": -1}).limit(2).await.expect("f").try_collect().await.expect("f2");
    println!("lt m3 desc limit2: {:?}", got.iter().map(|d| d.get_str("_id").unwrap_or("?")).collect::<Vec<_>>());
    let got: Vec<Document> = c.find(doc! {"outbox_pending": true}).sort(doc!{"message_id": 1}).limit(3).await.expect("f").try_collect().await.expect("f2");
    println!("pending: {:?}", got.iter().map(|d| d.get_str("_id").unwrap_or("?")).collect::<Vec<_>>());
    println!("first doc: {:?}", got.first());
    let r = c.update_many(doc! {"_id": {"$in": ["m0", "m1"]}}, doc! {"$unset": {"outbox_pending": ""}}).await;
    println!("unset: {r:?}");
    let got: Vec<Document> = c.find(doc! {"outbox_pending": true}).sort(doc!{"message_id": 1}).await.expect("f").try_collect().await.expect("f2");
    println!("pending after: {:?}", got.iter().map(|d| d.get_str("_id").unwrap_or("?")).collect::<Vec<_>>());
    let n = c.count_documents(doc! {"outbox_pending": true}).await;
    println!("count pending: {n:?}");
    let d = c.find_one(doc!{"_id": "m0"}).await;
    println!("m0: {d:?}");

    let l = db.collection::<Document>("relay_leases");
    let now = DateTime::now();
    let exp = DateTime::from_millis(now.timestamp_millis() + 5000);
    let opts = FindOneAndUpdateOptions::builder().upsert(true).return_document(ReturnDocument::After).build();
    let f = |me: &str| doc! {"_id": "chat.changes", "$or": [{"holder": me}, {"expires_at": {"$lt": now}}]};
    let r = l.find_one_and_update(f("A"), doc!{"$set": {"holder": "A", "expires_at": exp}}).with_options(opts.clone()).await;
    println!("A acquire: {r:?}");
    let r = l.find_one_and_update(f("B"), doc!{"$set": {"holder": "B", "expires_at": exp}}).with_options(opts.clone()).await;
    println!("B acquire (should fail 11000 or None): {r:?}");
    let r = l.find_one_and_update(f("A"), doc!{"$set": {"holder": "A", "expires_at": exp}}).with_options(opts.clone()).await;
    println!("A renew: {r:?}");
    let later = DateTime::from_millis(now.timestamp_millis() + 10000);
    let r = l.find_one_and_update(doc! {"_id": "chat.changes", "$or": [{"holder": "B"}, {"expires_at": {"$lt": later}}]}, doc!{"$set": {"holder": "B", "expires_at": later}}).with_options(opts.clone()).await;
    println!("B takeover after expiry: {r:?}");
    let r = l.update_one(doc!{"_id": "chat.changes", "holder": "B"}, doc!{"$set": {"expires_at": DateTime::from_millis(0)}}).await;
    println!("B release: {r:?}");
    let r = c.insert_one(doc! {"_id": "w1"}).write_concern(wc).await;
    println!("majority+j insert: {r:?}");
}
