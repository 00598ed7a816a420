// KeyFace: show the text a KeyFace node reports (Create Key: where the new key file is and to back it
// up; Restore Photo: what was verified) on the node itself, as read-only text. The frontend shows a
// node's `text` output only for nodes that ask for it. Never shown: key bytes (nodes never report them).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SHOWS_TEXT = new Set(["KeyFaceCreateKey", "KeyFaceRestorePhoto"]);
const WIDGET = "keyface_message";

app.registerExtension({
  name: "KeyFace.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;   // a message, not a setting: never written into the workflow
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      const [w, h] = this.size;
      const min = this.computeSize();
      this.setSize([Math.max(w, min[0], 360), Math.max(h, min[1], 140)]);
      this.graph?.setDirtyCanvas(true, true);
    };
  },
});
