// Drives the labbook console in Debian's headless Chromium: logs in, finds the failed booking,
// opens its timeline, replays its dead letter after a dry run and sees it move, resends its
// instance details email, then cancels it from its page and sees its machines terminated and
// the cancellation in its timeline with who did it. Takes a screenshot of each page, and
// checks that no page holds a password of the booking (read from the emails in maildev) and
// that a POST without the CSRF token is refused.
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN, BOOKING_ID (the failed booking), TRAINER (its
// trainer's address), MAILDEV_API (maildev's list of emails), SCREENSHOTS (a directory).
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL");
const token = env("CONSOLE_TOKEN");
const bookingId = env("BOOKING_ID");
const trainer = env("TRAINER");
const shots = env("SCREENSHOTS");
const operator = "Ada Operator";
mkdirSync(shots, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

/** Every password the emails to the trainer hold (trainees' and admins'). */
async function passwords() {
  const all = await (await fetch(env("MAILDEV_API"))).json();
  const mine = all.filter((e) => (e.to || []).some((t) => t.address === trainer));
  const found = new Set();
  for (const e of mine) {
    for (const m of (e.text || "").matchAll(/Password: (\S+)/g)) found.add(m[1]);
  }
  return [...found];
}

const pages = [];
async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  pages.push({ name, html: await page.content() });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();

  await page.goto(`${base}/bookings`);
  check(page.url().includes("/login"), "an anonymous visit is sent to the login page");
  await shot(page, "login");
  await page.fill("#name", operator);
  await page.fill("#token", token);
  await page.click("button[type=submit]");
  await page.waitForURL(/\/bookings/);
  check(!page.url().includes("/login"), "logged in with the console token");

  await page.selectOption("select[name=state]", "failed");
  await page.click("form.filters button.primary");
  await page.waitForURL(/state=failed/);
  const row = page.locator("tbody tr", { hasText: bookingId });
  check((await row.count()) === 1, "the failed booking is listed under state=failed");
  check(/\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z/.test(await row.innerText()), "times read as ISO UTC");
  check(
    (await page.locator("input[name=from]").getAttribute("type")) === "text",
    "the date filter takes ISO dates, not the browser's locale",
  );
  await page.goto(`${base}/bookings`);
  await shot(page, "bookings");

  await page.click(`a:text-is("${bookingId}")`);
  await page.waitForURL(new RegExp(`/bookings/${bookingId}$`));
  const timeline = await page.locator("ol.timeline").innerText();
  check(timeline.includes("Booking failed"), "the timeline tells the failure");
  check(timeline.includes("Dead letter in provision-due.dlq"), "the timeline shows the dead letter");
  await shot(page, "booking-failed");

  await page.goto(`${base}/dead-letters`);
  await shot(page, "dead-letters");
  await page.click('a:text-is("provision-due.dlq")');
  await page.fill("input[name=booking_id]", bookingId);
  await page.click("form.filters button.primary");
  await page.waitForURL(/booking_id=/);
  await shot(page, "dead-letter-queue");
  await page.click("td a.failure");
  await page.waitForURL(/\/letters\//);
  const letter = await page.content();
  check(!letter.includes("LongLongInt"), "header values read as values");
  const attempts = page.locator("tr", { hasText: "x-labbook-attempts" });
  check(/^x-labbook-attempts\s+\d+\s+labbook's own count/.test((await attempts.innerText()).trim()), "x-labbook-attempts is a number, explained");
  await shot(page, "dead-letter");
  await page.goBack();

  const letterUrl = pages.find((p) => p.name === "dead-letter");
  check(Boolean(letterUrl), "the dead letter's page was shown");
  await page.check("tbody input[type=checkbox]");
  await page.click('button:text("Replay ticked (dry run)")');
  await page.waitForURL(/\/replay\?/);
  const dry = await page.locator("[role=status]").innerText();
  check(/1 dead letter would go back to provision-due/.test(dry), "the dry run says what would move");
  await shot(page, "replay-dry-run");

  const csrfRefused = await page.request.post(`${base}/dead-letters/provision-due.dlq/replay`, {
    form: { id: await page.locator("form.actions input[name=id]").first().getAttribute("value") },
    maxRedirects: 0,
  });
  check(csrfRefused.status() === 403, "a POST without the CSRF token is refused");

  await page.click('button:text("Replay 1 dead letter")');
  await page.waitForURL(/\/replay$/);
  const done = await page.locator("[role=status]").innerText();
  check(done.includes("Replayed 1 dead letter(s) to provision-due; 0 left"), "the replay moved it");
  await shot(page, "replay-done");

  let state = "";
  for (let i = 0; i < 60 && state !== "provisioned"; i++) {
    await page.goto(`${base}/bookings/${bookingId}`);
    state = (await page.locator("h1 .badge").innerText()).trim();
    if (state !== "provisioned") await page.waitForTimeout(500);
  }
  check(state === "provisioned", "the replayed booking is provisioned");
  check((await page.locator("table a[href^='http://']").count()) > 0, "its machines have addresses");
  await shot(page, "booking-provisioned");

  await page.goto(`${base}/dead-letters/provision-due.dlq?booking_id=${bookingId}`);
  check((await page.content()).includes("No dead letter matches"), "its dead letter has left the queue");
  await page.goto(`${base}/health`);
  check((await page.locator("meta[http-equiv=refresh]").count()) === 1, "the health page refreshes itself");
  check((await page.locator("dt", { hasText: "Last tick" }).count()) === 1, "the health page shows the timer's last tick");
  await shot(page, "health");

  // Resend the instance details email: a confirmation, then one more copy, once.
  const instanceEmails = async () => {
    const all = await (await fetch(env("MAILDEV_API"))).json();
    return all.filter(
      (e) => (e.to || []).some((t) => t.address === trainer) && (e.text || "").includes(`Booking ID: ${bookingId}`) && /Access Information/.test(e.subject || ""),
    );
  };
  const before = (await instanceEmails()).length;
  await page.goto(`${base}/bookings/${bookingId}`);
  await page.click('a:text("Resend instance details email")');
  await page.waitForURL(/\/resend$/);
  check((await page.locator("[role=status]").innerText()).includes("Nothing has happened yet"), "a resend asks first");
  await page.click('button:text("Resend the email")');
  await page.locator("[role=status]", { hasText: "copy 1" }).waitFor();
  check(true, "the resend is copy 1");
  let resent = [];
  for (let i = 0; i < 60 && resent.length <= before; i++) {
    resent = await instanceEmails();
    if (resent.length <= before) await page.waitForTimeout(250);
  }
  check(resent.length === before + 1, "the instance details email went out once more");
  check(resent.some((e) => /\.copy1@/.test(e.headers["message-id"] || "")), "the copy has a Message-ID of its own");

  // Cancel from the booking's page: a confirmation, then the machines terminated.
  await page.goto(`${base}/bookings/${bookingId}`);
  await page.click('a:text("Cancel booking")');
  await page.waitForURL(/\/cancel$/);
  const confirm = await page.locator("[role=status]").innerText();
  check(/running machine\(s\) will be terminated/.test(confirm), "the cancellation says what it will do");
  await shot(page, "booking-cancel-confirm");
  await page.click('button:text("Cancel the booking")');
  await page.locator("[role=status]", { hasText: "confirmed by the broker" }).waitFor();
  check(true, "the cancellation is published, confirmed by the broker");
  let machines = [];
  for (let i = 0; i < 120; i++) {
    await page.goto(`${base}/bookings/${bookingId}`);
    state = (await page.locator("h1 .badge").innerText()).trim();
    machines = await page.locator("h2:text('Machines') + table tbody td:nth-child(3)").allInnerTexts();
    if (state === "cancelled" && machines.length > 0 && machines.every((m) => /terminated|shutting-down/.test(m))) break;
    await page.waitForTimeout(500);
  }
  check(state === "cancelled", "the booking is cancelled");
  check(machines.length > 0 && machines.every((m) => /terminated|shutting-down/.test(m)), `its machines are terminated (${machines.join(", ")})`);
  const story = await page.locator("ol.timeline").innerText();
  check(story.includes(`Cancelled (revision 1), published by ${operator} from the console`), "the timeline tells the cancellation and who did it");
  check(story.includes(`Instance details email resent by ${operator}`), "the timeline tells the resend and who did it");
  check(story.includes(`Dead letters replayed by ${operator}`), "the timeline tells the replay and who did it");
  check((story.match(/Cancelled \(revision 1\)/g) || []).length === 1, "the cancellation is told once");
  await shot(page, "booking-cancelled");

  const secrets = await passwords();
  check(secrets.length > 0, `the emails hold ${secrets.length} passwords to look for`);
  for (const p of pages) {
    for (const s of secrets) check(!p.html.includes(s), `no password on the ${p.name} page`);
  }

  const stranger = await browser.newContext();
  const anon = await stranger.newPage();
  for (const path of ["/bookings", `/bookings/${bookingId}`, "/dead-letters", "/health"]) {
    await anon.goto(`${base}${path}`);
    check(anon.url().includes("/login"), `${path} needs a login`);
  }
  const api = await stranger.request.get(`${base}/api/bookings`);
  check(api.status() === 401, "the API answers 401 without the token");
} finally {
  await browser.close();
}
