// placeholder
import { el } from "./ui.js";

export function init(section) {
  section.append(el("h2", {}, "chat"));
}
